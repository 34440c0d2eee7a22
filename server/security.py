"""TLS, mutual TLS and bearer-token auth, configured from ServerSettings.

    # TLS; clients verify the server with the CA that signed server.pem
    nextchar serve --tls-cert server.pem --tls-key server.key
    # mTLS: clients must present a certificate signed by clients-ca.pem
    nextchar serve --tls-cert server.pem --tls-key server.key \
        --tls-client-ca clients-ca.pem --tls-require-client-cert
    # tokens: every call (health excepted by default) needs `authorization: Bearer <token>`
    NEXTCHAR_AUTH_TOKENS=tok1,tok2 nextchar serve      # or --auth-tokens-file tokens.txt

A misconfiguration (missing file, key without certificate, no tokens in the file) stops the
server at start with one line naming the setting; it never falls back to plaintext or to open.
Tokens are compared in constant time through their sha256 and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

import grpc

from nextchar.kserve import grpc_predict_v2_pb2

from ..client.client import EncryptedKey, no_passphrase  # the client checks its key the same way
from .settings import ServerSettings

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/",
                       "/grpc.reflection.v1.ServerReflection/")
_KSERVE = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# The gRPC twins of HTTP's open /v2/health/live and /v2/health/ready (http/middleware.py), so a
# probe needs a token on neither front end or on both; ModelReady stays closed, as HTTP's
# /v2/models/{name}/ready is.
KSERVE_HEALTH_METHODS = tuple(f"/{_KSERVE.full_name}/{_KSERVE.methods_by_name[name].name}"
                              for name in ("ServerLive", "ServerReady"))


class SecurityConfigError(Exception):
    """TLS or auth settings that cannot work; raised at start-up, shown as one line."""


def _read_pem(path: Path, setting: str, marker: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"{setting} {path}: cannot read ({e.strerror})") from e
    if f"-----BEGIN {marker}".encode() not in data:
        what = f"PEM '{marker}' block" if marker else "PEM block (-----BEGIN ...)"
        raise SecurityConfigError(f"{setting} {path}: no {what} in the file")
    return data


def _check_key_pair(cert: Path, key: Path) -> None:
    """gRPC reports a key that is not the certificate's only as log lines and a failed bind;
    Python's ssl says what is wrong. A key under a passphrase is refused rather than prompted
    for on the terminal: gRPC cannot use it."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_passphrase)
    except EncryptedKey:
        raise SecurityConfigError(f"--tls-key {key}: the key is encrypted; gRPC needs it "
                                  f"unencrypted (openssl pkey -in {key} -out plain.key)") from None
    except ssl.SSLError as e:
        reason = "it is not the certificate's private key" if "MISMATCH" in str(e) else (
            e.reason or str(e)).lower().replace("_", " ")
        raise SecurityConfigError(f"--tls-key {key} does not go with --tls-cert {cert}: "
                                  f"{reason}") from None


def tls_flags_problem(s: ServerSettings) -> str | None:
    """A TLS flag given without the one it needs: a usage error, found before any file is read
    (`nextchar serve` exits 2 on it, as on every other bad flag)."""
    if s.tls_cert is None:
        if s.tls_key or s.tls_client_ca or s.tls_require_client_cert:
            return "--tls-key/--tls-client-ca/--tls-require-client-cert need --tls-cert as well"
        return None
    if s.tls_key is None:
        return "--tls-cert needs --tls-key (the certificate's private key)"
    if s.tls_require_client_cert and s.tls_client_ca is None:
        return "--tls-require-client-cert needs --tls-client-ca (the CA that signs client certificates)"
    if s.tls_client_ca is not None and not s.tls_require_client_cert:
        # gRPC's only other mode asks for a client certificate and verifies nothing: the CA
        # would guard the HTTP port and not the gRPC one.
        return ("--tls-client-ca needs --tls-require-client-cert (without it gRPC would not "
                "verify client certificates)")
    return None


def server_credentials(s: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings; None when TLS is off (no --tls-cert)."""
    problem = tls_flags_problem(s)
    if problem is not None:
        raise SecurityConfigError(problem)
    if s.tls_cert is None or s.tls_key is None:
        return None
    cert = _read_pem(s.tls_cert, "--tls-cert", "CERTIFICATE")
    key = _read_pem(s.tls_key, "--tls-key", "")  # RSA, EC or PKCS#8: any BEGIN block
    _check_key_pair(s.tls_cert, s.tls_key)
    client_ca = None
    if s.tls_client_ca is not None:
        client_ca = _read_pem(s.tls_client_ca, "--tls-client-ca", "CERTIFICATE")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=s.tls_require_client_cert
    )


class TokenSet:
    """Accepted bearer tokens, kept as sha256 digests and compared in constant time. With admin
    tokens (--admin-tokens-file), only those may call model control; they are accepted for
    every other call too."""

    def __init__(self, tokens: Sequence[str], admin: Sequence[str] = ()) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in [*tokens, *admin]]
        self._admin = [hashlib.sha256(t.encode()).digest() for t in admin]

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def restricts_control(self) -> bool:
        return bool(self._admin)

    def accepts(self, token: str) -> bool:
        return _any_equal(self._digests, token)

    def may_control(self, token: str) -> bool:
        """Whether an accepted token may load, unload or reload models."""
        return not self._admin or _any_equal(self._admin, token)


def _any_equal(digests: Sequence[bytes], token: str) -> bool:
    digest = hashlib.sha256(token.encode()).digest()
    found = False
    for d in digests:  # no early exit: time does not depend on which token matched
        found |= hmac.compare_digest(d, digest)
    return found


def _tokens_from_file(path: Path, flag: str) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityConfigError(f"{flag} {path}: cannot read ({e})") from e
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        # Not refused (a mounted secret's mode is the orchestrator's; the group is how
        # Kubernetes' fsGroup lets the server read it), but said: every local user could.
        log.warning("%s %s is readable by every user (mode %o): chmod o-rwx it", flag, path, mode)
    tokens = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not tokens:
        raise SecurityConfigError(f"{flag} {path}: no tokens in it (one per line; '#' starts a "
                                  f"comment)")
    return tokens


def load_tokens(s: ServerSettings) -> TokenSet | None:
    """Tokens from --auth-tokens-file, NEXTCHAR_AUTH_TOKENS and --admin-tokens-file; None when
    auth is off."""
    tokens = [t.strip() for t in s.auth_tokens.split(",") if t.strip()]
    if s.auth_tokens and not tokens:  # set, to blanks or commas: a mistake, never "auth off"
        raise SecurityConfigError("NEXTCHAR_AUTH_TOKENS is set but holds no tokens (comma-"
                                  "separated; unset it, or set it empty, to turn auth off)")
    if s.auth_tokens_file is not None:
        tokens += _tokens_from_file(s.auth_tokens_file, "--auth-tokens-file")
    admin = ([] if s.admin_tokens_file is None else
             _tokens_from_file(s.admin_tokens_file, "--admin-tokens-file"))
    if not tokens and not admin:
        return None
    if any(len(t) < 16 or not t.isascii() or not t.isprintable() or " " in t
           for t in [*tokens, *admin]):
        raise SecurityConfigError("auth tokens must be printable ASCII without spaces, at least "
                                  "16 characters (e.g. `openssl rand -hex 32`)")
    return TokenSet(tokens, admin)


def open_method(method: str, s: ServerSettings) -> bool:
    """Whether a method is answered without a token while auth is on."""
    if method.startswith(HEALTH_PREFIX) or method in KSERVE_HEALTH_METHODS:
        return s.auth_open_health
    if method.startswith(REFLECTION_PREFIXES):
        return s.auth_open_reflection
    return False


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == AUTH_HEADER and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


# Calls that change what the server serves, while auth is off: loopback callers only, so an
# open port does not let anyone load or unload models (gRPC: grpc/wrapping.py; HTTP: http/v2.py).
CONTROL_LOOPBACK_ONLY = (
    "model control (Admin, repository load/unload) is open to loopback callers only while auth "
    "is off: call from this host, or start the server with --auth-tokens-file and send a token")


# With --admin-tokens-file, a token from the other sources calling model control.
CONTROL_ADMIN_ONLY = ("this token may not change what is served (Admin, repository load/"
                      "unload): those calls need a token of --admin-tokens-file")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, localhost, and 127.x as a dual-stack socket reports it
    (::ffff:127.0.0.1)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # IPv6 only
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def warn_if_exposed(s: ServerSettings, tls: bool, tokens: TokenSet | None) -> None:
    """Start-up warnings for settings that are legal but probably not meant."""
    if is_loopback(s.host):
        return
    if tokens is None:
        log.warning("listening on %s without auth: anyone who reaches the port may call every "
                    "RPC, Admin.ReloadModel included (set --auth-tokens-file)", s.host)
    elif not tls:
        log.warning("bearer tokens over plaintext on %s: anyone on the path can read them "
                    "(set --tls-cert/--tls-key)", s.host)
