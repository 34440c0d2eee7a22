"""The nextchar client: one class, sync, a context manager.

    from nextchar.client import NextCharClient
    with NextCharClient("127.0.0.1:50051", timeout_s=5) as c:
        for pred in c.predict(["To be, or not to b"], top_k=3):
            print(pred.top[0].char, pred.top[0].prob)

Errors are `NextCharError` with the gRPC status code kept (`.code`) and the RpcError chained.
TLS: `tls_ca=` (the server's CA; `tls=True` for the system roots), mTLS: `tls_cert=`/`tls_key=`;
a bearer token (`token=`) goes with every call as `authorization` metadata.
Several addresses (or a DNS name resolving to several replicas) are load-balanced by gRPC's
own `round_robin` policy.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import math
import re
import socket
import ssl
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextchar.v1 import admin_pb2, admin_pb2_grpc
from nextchar.v1 import nextchar_pb2 as pb
from nextchar.v1 import nextchar_pb2_grpc as pb_grpc

from .limits import DEFAULT_PORT, FLOAT32_MAX, MAX_TIMEOUT_S, UINT32_MAX, UINT64_MAX

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CLOSED = "this NextCharClient is closed; make a new one"
# Codes a health probe answers that no wait changes: wait_until_serving raises them at once.
_FINAL = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNIMPLEMENTED})

# gRPC's own retry policy, for the calls a server refuses without running them. A draining
# server sends GOAWAY and closes its listener; a call that raced it is answered UNAVAILABLE
# (the connection went away) or, when it arrived but no handler took it yet, CANCELLED by gRPC
# core (grpc/grpc#41785). gRPC retries such a call on another ready replica of the channel
# (round_robin), else it meets the closed port again and fails UNAVAILABLE after the last
# attempt. Safe because these calls are idempotent and this client never cancels a unary call
# itself. RESOURCE_EXHAUSTED (overload) and deadlines stay the caller's policy (client.batch
# has one with backoff). A Generate stream is retried only before its first response, which
# gRPC guarantees.
_RETRY_REFUSED = {"maxAttempts": 5, "initialBackoff": "0.02s", "maxBackoff": "0.2s",
                  "backoffMultiplier": 2, "retryableStatusCodes": ["CANCELLED", "UNAVAILABLE"]}
SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "nextchar.v1.NextChar", "method": m}
                 for m in ("Predict", "GetModelInfo", "Generate", "ListModels")]
        + [{"service": "grpc.health.v1.Health", "method": "Check"}],
        "retryPolicy": _RETRY_REFUSED,
    }],
}


class NextCharError(Exception):
    """A failed call; `code` is the grpc.StatusCode, `details` the server's message,
    `request_id` the server's `x-request-id` for the call (the id its logs carry; None for a
    call refused before it reached a server)."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as cls(*args), and args is the one formatted message: an error
        # raised in a process pool's worker would break the pool instead of reaching the caller.
        return type(self), (self.code, self.details, self.request_id)

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> NextCharError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(code, details or "", _request_id(e))


def _request_id(e: grpc.RpcError) -> str | None:
    """The server sends x-request-id with the status (trailing metadata) of every call, and in
    the initial metadata of a stream too (a stream cancelled mid-way gets no trailers)."""
    for name in ("trailing_metadata", "initial_metadata"):
        get = getattr(e, name, None)
        try:
            metadata = get() if get is not None else None
        except Exception:  # an RpcError raised before the call started has no metadata
            metadata = None
        for key, value in metadata or ():
            if key == "x-request-id":
                return str(value)
    return None


PRIORITIES = {"high": pb.PRIORITY_HIGH, "low": pb.PRIORITY_LOW}


def _invalid(message: str) -> NextCharError:
    return NextCharError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_uint(name: str, value: Any, maximum: int = UINT32_MAX, minimum: int = 0) -> int:
    """An integer field of a request, checked here so a bad value is INVALID_ARGUMENT naming the
    field (protobuf itself raises ValueError/TypeError without the field's name)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise _invalid(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_float32(name: str, value: Any) -> float:
    """A float field of the proto: beyond float32 protobuf sends inf, and the server's refusal
    would quote a value the caller never gave."""
    v = _check_float(name, value)
    if math.isfinite(v) and abs(v) > FLOAT32_MAX:
        raise _invalid(f"{name} must be within float32 (at most {FLOAT32_MAX:.4g}), got {value}")
    return v


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string, got {value!r}")
    _check_unicode(name, value)
    return value


def _check_unicode(name: str, value: str) -> None:
    """A lone surrogate (what os.fsdecode and argv make of bytes that are not UTF-8) cannot be
    sent: protobuf would raise UnicodeEncodeError building the request."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _invalid(f"{name}: character U+{ord(value[e.start]):04X} at position {e.start} "
                       f"is a lone surrogate, not valid Unicode") from None


def priority_value(priority: str | int | None) -> int:
    """'high' | 'low' | None (the server's default lane) | a `Priority` enum value."""
    if priority is None or priority == "":
        return pb.PRIORITY_UNSPECIFIED
    if isinstance(priority, str):
        key = priority.lower().removeprefix("priority_")
        if key in PRIORITIES:
            return PRIORITIES[key]
    elif isinstance(priority, int) and not isinstance(priority, bool) \
            and priority in pb.Priority.values():
        return priority
    raise _invalid(f"priority must be 'high' or 'low', got {priority!r}")


# What follows the first colon of `host:port`: digits, or nothing (the default port); a sign
# is caught so `:-1` is refused as a port rather than passed on as a URI.
_PORT_LIKE = re.compile(r"[-+]?[0-9]*")
# The URI schemes gRPC's resolvers take (dns: is parsed above). Anything else before a colon is
# a host with a mistyped port: gRPC would try to resolve "localhost:5005l" as a name.
_GRPC_SCHEMES = ("ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p")


def with_default_port(server: str) -> str:
    """'host' and 'host:' -> 'host:50051' (gRPC alone would dial 443); a port outside 1-65535 is
    INVALID_ARGUMENT (gRPC would wrap it: :84067 dials 18531). Other URI schemes (unix:, ...)
    and ipv4:/ipv6: lists stay as written."""
    scheme = ""
    address = server
    for prefix in ("dns:///", "dns:"):
        if server.startswith(prefix):
            scheme, address = prefix, server[len(prefix):]
            break
    else:
        if ":" in server and not server.startswith("[") and not _is_ipv6(server):
            prefix, _, rest = server.partition(":")
            if not _PORT_LIKE.fullmatch(rest):
                if prefix.lower() in ("ipv4", "ipv6") and rest and "," not in rest:
                    return f"{prefix}:{with_default_port(rest)}"  # one address: its port too
                if prefix.lower() in _GRPC_SCHEMES:  # unix:/run/x.sock, ipv4:a:1,b:2, ...
                    return server
                raise _invalid(f"server address {server!r}: port {rest!r} is not a number "
                               f"(give host:port, or a gRPC URI: dns:///, ipv4:, unix:, ...)")
    if address.startswith("["):  # [v6] or [v6]:port
        host, _, port = address.partition("]")
        host, port = host + "]", port.removeprefix(":")
    elif _is_ipv6(address):  # a bare IPv6 literal: brackets so the port is unambiguous
        host, port = f"[{address}]", ""
    else:
        host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    if host in ("", "[]"):
        raise _invalid(f"server address {server!r} names no host")
    if not port:
        return f"{scheme}{host}:{DEFAULT_PORT}"
    if not (port.isdigit() and port.isascii() and 1 <= int(port) <= 65535):
        raise _invalid(f"server address {server!r}: port {port} is not between 1 and 65535")
    return server


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def target_for(servers: Sequence[str] | str) -> str:
    """One address stays as is (a `dns:///name:port` resolving to several replicas is balanced
    too); several become one ipv4: or ipv6: list gRPC balances over, hostnames resolved here."""
    if isinstance(servers, str):
        return with_default_port(servers)
    if not servers:
        raise _invalid("no server address given")
    servers = [with_default_port(server) for server in servers]
    if len(servers) == 1:
        return servers[0]
    for server in servers:
        scheme = server.partition(":")[0].lower()
        if (scheme in _GRPC_SCHEMES and (scheme not in ("ipv4", "ipv6") or "," in server)) \
                or (server.startswith("dns:") and not server.startswith("dns:///")):
            raise _invalid(f"server address {server!r} is a gRPC URI of its own: give it "
                           f"alone, or list host:port, [v6]:port, ipv4:ip:port or "
                           f"dns:///host:port addresses")
    families: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    for server in servers:
        family, addresses = _resolve(server)
        families[family].extend(a for a in addresses if a not in families[family])
    if families["ipv4"] and families["ipv6"]:
        raise NextCharError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"servers {', '.join(servers)}: gRPC balances over IPv4 or IPv6 "
                            f"addresses, not both; give addresses of one family")
    family = "ipv4" if families["ipv4"] else "ipv6"
    return f"{family}:" + ",".join(families[family])


def _resolve(server: str) -> tuple[str, list[str]]:
    """'host:port' -> ('ipv4' | 'ipv6', ['ip:port', ...]); IP literals stay as written."""
    address = server.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if address.startswith("["):  # [v6]:port
        host, _, port = address[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit() or ":" in host:  # no port, or a bare IPv6 literal
            host, port = address, ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.version == 4:
            return "ipv4", [address]
        return "ipv6", [f"[{host}]:{port}" if port else f"[{host}]"]
    try:
        infos = socket.getaddrinfo(host, int(port or 443), proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        raise NextCharError(grpc.StatusCode.UNAVAILABLE, f"cannot resolve {server}: {e}") from e
    # sockaddr[0] is the host as a str for AF_INET/AF_INET6 (typeshed allows bytes in general).
    v4 = [f"{i[4][0]}:{i[4][1]}" for i in infos if i[0] == socket.AF_INET]  # type: ignore[str-bytes-safe]
    if v4:
        return "ipv4", v4
    return "ipv6", [f"[{i[4][0]}]:{i[4][1]}" for i in infos if i[0] == socket.AF_INET6]  # type: ignore[str-bytes-safe]


def _read(path: str | Path, what: str) -> bytes:
    """A PEM file's bytes; one that is not PEM fails here, in one line, rather than as gRPC
    core log lines and an UNAVAILABLE "Failed to create security handshaker"."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise NextCharError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{what} {path}: cannot read ({e.strerror})") from e
    if b"-----BEGIN " not in data:
        raise NextCharError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{what} {path}: not a PEM file (no -----BEGIN line)")
    return data


class EncryptedKey(Exception):
    """A PEM key under a passphrase, which gRPC cannot use (the server's check raises it too)."""


def no_passphrase() -> bytes:
    """ssl's password callback: a key that asks for one is refused, not prompted for."""
    raise EncryptedKey


def _check_pair(cert: str | Path, key: str | Path) -> None:
    """The client certificate and its key, loaded together as OpenSSL will at the handshake:
    a key that is not the certificate's, or one under a passphrase (gRPC cannot ask for it),
    fails here in one line, rather than as gRPC core log lines and a vague UNAVAILABLE."""
    _read(cert, "--tls-cert")  # unreadable or not PEM: named as such first
    _read(key, "--tls-key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=no_passphrase)
    except EncryptedKey:
        raise NextCharError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"--tls-key {key}: the key is encrypted; gRPC needs it unencrypted "
                            f"(openssl pkey -in {key} -out plain.key)") from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise NextCharError(grpc.StatusCode.INVALID_ARGUMENT,
                                f"--tls-key {key} does not go with --tls-cert {cert}: it is not "
                                f"the certificate's private key") from None
        raise NextCharError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"--tls-cert {cert} must hold a PEM certificate and --tls-key {key} "
                            f"its PEM private key: OpenSSL cannot load them as such "
                            f"({e.reason or e.library})") from None


def channel_credentials(
    tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: tls_ca verifies the server (None: system roots); cert+key for mTLS."""
    if (tls_cert is None) != (tls_key is None):
        raise NextCharError(grpc.StatusCode.INVALID_ARGUMENT,
                            "--tls-cert and --tls-key go together (the client certificate and its key)")
    if tls_cert is not None and tls_key is not None:
        _check_pair(tls_cert, tls_key)
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls_ca is None else _read(tls_ca, "--tls-ca"),
        private_key=None if tls_key is None else _read(tls_key, "--tls-key"),
        certificate_chain=None if tls_cert is None else _read(tls_cert, "--tls-cert"),
    )


def check_token(token: Any) -> str:
    """A bearer token travels in an HTTP/2 header: printable ASCII without spaces, as the server
    requires of its tokens. Anything else would fail as gRPC core log lines and INTERNAL
    "Invalid metadata". The message names the character, never the token (a secret)."""
    if not isinstance(token, str):  # not _check_str: its message would name the character
        raise _invalid(f"token must be a string, got {type(token).__name__}")
    for pos, ch in enumerate(token):
        if not (ch.isascii() and ch.isprintable()) or ch == " ":
            raise _invalid(f"token must be printable ASCII without spaces; character "
                           f"U+{ord(ch):04X} at position {pos} is not")
    return str(token)


def check_timeout(timeout_s: Any) -> float:
    """A per-call deadline in seconds: > 0, and at most MAX_TIMEOUT_S (gRPC's deadlines end
    there; a longer one fails DEADLINE_EXCEEDED at once)."""
    value = _check_float("timeout_s", timeout_s)
    if not value > 0:
        raise _invalid(f"timeout_s must be > 0 seconds, got {timeout_s}")
    if not value <= MAX_TIMEOUT_S:
        raise _invalid(f"timeout_s must be at most {MAX_TIMEOUT_S:.0f} seconds (about 31 years), "
                       f"got {timeout_s}")
    return value


class _CallDetails(
    namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call on the channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(d.metadata or ()), self._header]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _TraceContext(_BearerToken):
    """Sends the caller's current OpenTelemetry span as W3C `traceparent` metadata, so the
    server's spans join the caller's trace. Used only where opentelemetry is installed (the
    thin client does not need it)."""

    def __init__(self) -> None:
        from opentelemetry.propagate import inject

        self._inject = inject

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        carrier: dict[str, str] = {}
        self._inject(carrier)
        if not carrier:
            return d  # type: ignore[return-value]  # no active span: the call as it was
        metadata = [*(d.metadata or ()), *carrier.items()]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))


T = TypeVar("T")


class Stream(Iterator[T]):
    """A streaming call's responses: an iterator that is also a context manager; `close()`
    cancels the call on the server (closing an ended stream does nothing). `close()` may come
    from another thread while one iterates: the iterating thread's loop then simply ends."""

    def __init__(self, items: Iterator[T], cancel: Callable[[], object] | None = None) -> None:
        self._items, self._cancel = items, cancel

    def __next__(self) -> T:
        return next(self._items)

    def close(self) -> None:
        if self._cancel is not None:
            self._cancel()  # gRPC's cancel is thread-safe, unlike closing a running generator
        close = getattr(self._items, "close", None)
        if close is not None:
            try:
                close()
            except ValueError:  # "generator already executing" in another thread: the cancel
                pass  # above ends it there

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # What a plain generator does when dropped: a `for` loop that breaks out of the call
        # itself cancels it at once (CPython frees the iterator then).
        self.close()


class _Call:
    """One Generate call and whether this side ended it (a cancel it asked for is no error)."""

    def __init__(self, call: Any, client: NextCharClient) -> None:
        self.call, self.client, self.cancelled = call, client, False

    def cancel(self) -> None:
        self.cancelled = True
        self.call.cancel()  # no-op once the stream ended; frees the server's slot otherwise

    def responses(self) -> Iterator[pb.GenerateResponse]:
        try:
            yield from self.call
        except grpc.RpcError as e:
            if self.client._closed:
                raise NextCharError(grpc.StatusCode.FAILED_PRECONDITION, CLOSED) from e
            if self.cancelled and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise NextCharError.from_rpc_error(e) from e
        finally:
            self.call.cancel()


def _texts_of(responses: Stream[pb.GenerateResponse]) -> Iterator[str]:
    with responses:  # closing the texts closes (cancels) the call under them
        for response in responses:
            if response.text:
                yield response.text


def _trace_context() -> _TraceContext | None:
    """The traceparent interceptor where OpenTelemetry's API imports; None without it, and with
    a partial install (opentelemetry-proto alone has no `opentelemetry.propagate`)."""
    if importlib.util.find_spec("opentelemetry") is None:
        return None
    try:
        return _TraceContext()
    except ImportError:
        return None


class NextCharClient:
    """A client of one server, or of several replicas balanced by gRPC (`servers`). Every
    method raises NextCharError; the channel is thread-safe, so threads may share a client.
    timeout_s: each call's default deadline (None: none); a method's own timeout_s=None means
    this default."""

    def __init__(
        self,
        servers: Sequence[str] | str = "127.0.0.1:50051",
        timeout_s: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> None:
        """tls_server_name: the name to verify in the server's certificate when it differs from
        the address (e.g. an IP address, or several replicas behind one certificate)."""
        if timeout_s is not None:  # None: no deadline
            check_timeout(timeout_s)
        if token:
            check_token(token)
        max_message_bytes = check_uint("max_message_bytes", max_message_bytes, minimum=1,
                                       maximum=2**31 - 1)  # gRPC's options are C ints
        secure = tls or tls_ca is not None or tls_cert is not None or tls_key is not None
        if tls_server_name and not secure:
            # Without TLS there is no certificate to verify the name against: a caller who set
            # it meant TLS, and must not get plaintext instead.
            raise _invalid("tls_server_name (--tls-server-name) is the name to verify in the "
                           "server's certificate: it needs TLS (tls=True or tls_ca)")
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            # gRPC's reconnect backoff grows to 120 s by default: a long job would then sit idle
            # for minutes after a restarted server is back.
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        target = target_for(servers)
        self.target = target
        if secure:  # any TLS setting means TLS: a lone key is refused there, never plaintext
            self._channel = grpc.secure_channel(
                target, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self.channel = self._channel
        if token:
            self.channel = grpc.intercept_channel(self._channel, _BearerToken(token))
        trace = _trace_context()
        if trace is not None:
            self.channel = grpc.intercept_channel(self.channel, trace)
        self._closed = False
        self.stub = pb_grpc.NextCharStub(self.channel)
        self.admin_stub = admin_pb2_grpc.AdminStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> NextCharClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def _check_open(self) -> None:
        # gRPC's own error for a closed channel is a bare ValueError.
        if self._closed:
            raise NextCharError(grpc.StatusCode.FAILED_PRECONDITION, CLOSED)

    def _timeout(self, timeout_s: float | None) -> float | None:
        if timeout_s is None:
            return self.timeout_s
        check_timeout(timeout_s)
        return timeout_s

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        timeout = self._timeout(timeout_s)
        self._check_open()
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            if self._closed:  # closed by another thread mid-call: gRPC says only CANCELLED
                raise NextCharError(grpc.StatusCode.FAILED_PRECONDITION, CLOSED) from e
            raise NextCharError.from_rpc_error(e) from e
        except ValueError as e:  # closed between the check above and the call
            if self._closed:
                raise NextCharError(grpc.StatusCode.FAILED_PRECONDITION, CLOSED) from e
            raise

    def predict(
        self,
        texts: Sequence[str],
        top_k: int = 0,
        per_position: bool = False,
        timeout_s: float | None = None,
        states: Sequence[bytes] = (),
        return_state: bool = False,
        model: str = "",
        priority: str | int | None = None,
    ) -> list[pb.Prediction]:
        """states: none, or per text the `Prediction.state` of the text it continues (b"": fresh);
        return_state: each Prediction carries its `.state` to continue from later;
        model: a name from `list_models()` ("" = the server's default model);
        priority: "high" (interactive) or "low" (bulk work); None = the server's default."""
        request = predict_request(texts, top_k, per_position, states, return_state, model,
                                  priority)
        return list(self._call(self.stub.Predict, request, timeout_s).predictions)

    def generate(
        self,
        prompt: str,
        max_chars: int = 200,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        state: bytes = b"",
        timeout_s: float | None = None,
        model: str = "",
        priority: str | int | None = None,
    ) -> Stream[str]:
        """Yields the generated text, chunk by chunk, as the server produces it.

        The call is cancelled on the server when the stream is closed: by `with c.generate(...)
        as chunks:`, by `chunks.close()`, or when Python drops the iterator (a `for` loop over
        the call itself that ends in break or an exception). An iterator kept in a variable
        lives on after a break, and so does the server's work: close it, or use `with`.
        For the stop reason and the final state, use `generate_responses`. An argument of the
        wrong type or out of its field's range raises NextCharError(INVALID_ARGUMENT) here;
        what the server's own rules refuse (an empty prompt, a negative temperature, top_p
        above 1, a limit of the model) raises it at the first chunk, from the server.
        """
        request = generate_request(prompt, max_chars, temperature, top_k, top_p, seed, stop, state,
                                   model=model, priority=priority)
        responses = self.generate_responses(request, timeout_s)
        return Stream(_texts_of(responses), responses.close)

    def generate_responses(
        self, request: pb.GenerateRequest, timeout_s: float | None = None
    ) -> Stream[pb.GenerateResponse]:
        """The raw Generate stream; the last response has stop_reason (and state) set. Closing
        it cancels the call, as for `generate`."""
        timeout = self._timeout(timeout_s)  # checked now, not at the first response
        self._check_open()
        try:
            call = _Call(self.stub.Generate(request, timeout=timeout), self)
        except ValueError as e:  # the channel closed since the check: gRPC's bare error
            raise NextCharError(grpc.StatusCode.FAILED_PRECONDITION, CLOSED) from e
        return Stream(call.responses(), call.cancel)

    def predict_response(self, request: pb.PredictRequest, timeout_s: float | None = None) -> pb.PredictResponse:
        return self._call(self.stub.Predict, request, timeout_s)

    def reload_model(self, model: str = "", timeout_s: float | None = None
                     ) -> admin_pb2.ReloadModelResponse:
        """Admin: load and swap in the newest version of a model now ("" = the default model;
        needs the admin token). `reloaded` False comes with the `reason`."""
        request = admin_pb2.ReloadModelRequest(model=_check_str("model", model))
        return self._call(self.admin_stub.ReloadModel, request, timeout_s)

    def load_model(self, name: str, timeout_s: float | None = None) -> admin_pb2.LoadModelResponse:
        """Admin: load a model of the server's repository (or reload a loaded one)."""
        request = admin_pb2.LoadModelRequest(model=_model_name(name))
        return self._call(self.admin_stub.LoadModel, request, timeout_s)

    def unload_model(self, name: str, timeout_s: float | None = None
                     ) -> admin_pb2.UnloadModelResponse:
        """Admin: stop serving a model; its accepted calls finish first."""
        request = admin_pb2.UnloadModelRequest(model=_model_name(name))
        return self._call(self.admin_stub.UnloadModel, request, timeout_s)

    def model_info(self, model: str = "", timeout_s: float | None = None
                   ) -> pb.GetModelInfoResponse:
        """Vocabulary, config, backend, device, version and limits of a model ("" = default)."""
        request = pb.GetModelInfoRequest(model=_check_str("model", model))
        return self._call(self.stub.GetModelInfo, request, timeout_s)

    def list_models(self, timeout_s: float | None = None) -> pb.ListModelsResponse:
        """The models the server knows: name, version served, state, which one is the default."""
        return self._call(self.stub.ListModels, pb.ListModelsRequest(), timeout_s)

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """'SERVING', 'NOT_SERVING', ... for the server ('') or one service name."""
        request = health_pb2.HealthCheckRequest(service=_check_str("service", service))
        try:
            resp = self._call(self.health_stub.Check, request, timeout_s)
        except NextCharError as e:
            if e.code == grpc.StatusCode.NOT_FOUND and not e.details:
                # gRPC's health servicer answers an unknown service with an empty message.
                raise NextCharError(e.code, f"no health status for service {service!r} on this "
                                            f"server ('' is the whole server, "
                                            f"'nextchar.v1.NextChar' the API)") from e
            raise
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout_s: float = 60.0) -> None:
        """Blocks until health says SERVING; raises NextCharError(DEADLINE_EXCEEDED) after
        timeout_s, and at once for what waiting cannot change (a closed client, a refused
        token, a server without health)."""
        import time

        check_timeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while (left := deadline - time.monotonic()) > 0:
            try:
                last = self.health(timeout_s=min(1.0, left))
                if last == "SERVING":
                    return
            except NextCharError as e:
                if e.code in _FINAL:
                    raise
                last = e.code.name
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        raise NextCharError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"server not SERVING after {timeout_s:g}s (last: {last})")


def _model_name(name: Any) -> str:
    if not _check_str("model", name):
        raise _invalid("model: a name is needed (see `nextchar models`)")
    return str(name)


def _texts(name: str, values: Any, kind: type) -> list[Any]:
    if isinstance(values, (str, bytes)):
        raise _invalid(f"{name} must be a list of {kind.__name__}, not one {type(values).__name__}")
    out = list(values)
    for i, value in enumerate(out):
        if not isinstance(value, kind):
            raise _invalid(f"{name}[{i}] must be {kind.__name__}, got {type(value).__name__}")
        if isinstance(value, str):
            _check_unicode(f"{name}[{i}]", value)
    return out


def predict_request(
    texts: Sequence[str],
    top_k: int = 0,
    per_position: bool = False,
    states: Sequence[bytes] = (),
    return_state: bool = False,
    model: str = "",
    priority: str | int | None = None,
) -> pb.PredictRequest:
    """A PredictRequest, every field checked: a bad value is NextCharError(INVALID_ARGUMENT)."""
    return pb.PredictRequest(texts=_texts("texts", texts, str), top_k=check_uint("top_k", top_k),
                             per_position=bool(per_position),
                             states=_texts("states", states, bytes),
                             return_state=bool(return_state), model=_check_str("model", model),
                             priority=priority_value(priority))  # type: ignore[arg-type]


def generate_request(
    prompt: str,
    max_chars: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    state: bytes = b"",
    return_state: bool = False,
    model: str = "",
    priority: str | int | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest, every field checked: a bad value is NextCharError(INVALID_ARGUMENT)."""
    if not isinstance(state, bytes):
        raise _invalid(f"state must be bytes, got {type(state).__name__}")
    return pb.GenerateRequest(
        prompt=_check_str("prompt", prompt), max_chars=check_uint("max_chars", max_chars),
        temperature=_check_float32("temperature", temperature),
        top_k=check_uint("top_k", top_k), top_p=_check_float32("top_p", top_p),
        seed=None if seed is None else check_uint("seed", seed, UINT64_MAX),
        stop=_texts("stop", stop, str), state=state, return_state=bool(return_state),
        model=_check_str("model", model),
        priority=priority_value(priority))  # type: ignore[arg-type]


def prediction_to_dict(text: str, pred: pb.Prediction) -> dict[str, Any]:
    """The stable JSON shape of one prediction (documented in the README)."""
    out: dict[str, Any] = {
        "text": text,
        "top": [{"char": c.char, "prob": round(c.prob, 6)} for c in pred.top],
    }
    if pred.argmax_text:
        out["argmax"] = pred.argmax_text
        out["positions"] = [{"char": c.char, "prob": round(c.prob, 6)} for c in pred.positions]
    return out


def message_to_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as the CLI prints it: the proto's field names (snake_case, as in the
    .proto, grpcurl and the README), every field (defaults included), 64-bit integers as JSON
    numbers (proto3 JSON would quote them), enums by name, bytes as base64."""
    import base64

    from google.protobuf.descriptor import FieldDescriptor

    def value(field: Any, v: Any) -> Any:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return message_to_dict(v)
        if field.type == FieldDescriptor.TYPE_ENUM:
            named = field.enum_type.values_by_number.get(v)
            return named.name if named is not None else v
        if field.type == FieldDescriptor.TYPE_BYTES:
            return base64.b64encode(v).decode("ascii")
        if field.type in (FieldDescriptor.TYPE_FLOAT,):
            return float(f"{v:.7g}")  # float32: the digits it holds, not 0.9700000286102295
        return v

    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        v = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [value(field, item) for item in v]
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = value(field, v)
    return out
