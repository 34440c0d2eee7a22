"""Every gRPC call's outer layers, wrapped around each method's handler once, at registration.

In order, outermost first:

1. Telemetry (../telemetry.py, shared with the HTTP front end): request id, drain gate, call
   tracking, metrics and access log; for every method but health and reflection.
2. Auth (../security.py): a call without an accepted bearer token is answered UNAUTHENTICATED,
   unless its method is open (health, reflection: settings).
3. Error mapping, for every handler kind (client-streaming ones included): ServingError
   subclasses carry their code and a message meant for the caller; anything else is a bug,
   logged with its traceback and answered INTERNAL with a generic message, so no internal text
   reaches clients and the server stays up. A request that does not decode (e.g. a string field
   with invalid UTF-8) is answered INVALID_ARGUMENT instead of gRPC's default INTERNAL
   "Exception deserializing request!", or for a request stream, UNKNOWN.

Why not interceptors: grpc.aio asks every interceptor for the handler on every call (a coroutine
each), and each wrapped handler added a coroutine layer; together ~40-60 us of the event loop's
time per call, about a tenth of a Predict's (docs/benchmarks.md). `WrappingServer` stands in for
the server while services register, so each handler is wrapped once, in one layer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError

from ..errors import ServingError
from ..logging_setup import REQUEST_ID_HEADER, request_id_var
from ..security import CONTROL_ADMIN_ONLY, CONTROL_LOOPBACK_ONLY, bearer_token, is_loopback
from ..telemetry import DRAINING_MESSAGE, Telemetry

log = logging.getLogger(__name__)

MISSING_TOKEN = ("missing bearer token: send metadata 'authorization: Bearer <token>' "
                 "(nextchar --token or NEXTCHAR_TOKEN)")
STREAM_ENDED = ("server is shutting down: stream ended early; continue on another replica "
                "(Generate: send the prompt plus the text received so far)")


class Auth:
    """Bearer tokens: `accepts(token)` decides; `is_open(method)` names the methods answered
    without one; `may_control(token)`, whether an accepted token may call CONTROL_METHODS."""

    def __init__(self, accepts: Callable[[str], bool], is_open: Callable[[str], bool],
                 may_control: Callable[[str], bool] = lambda _: True) -> None:
        self.accepts = accepts
        self.is_open = is_open
        self.may_control = may_control

    async def check(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """Aborts the call with UNAUTHENTICATED unless it carries an accepted token, and a
        control call with PERMISSION_DENIED unless that token may control."""
        token = bearer_token(context.invocation_metadata())  # type: ignore[arg-type]
        if token is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
        elif not self.accepts(token):
            log.info("rejected a call to %s: token not accepted", method)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bearer token not accepted")
        elif method.startswith(CONTROL_METHODS) and not self.may_control(token):
            log.info("refused %s: the token is not an admin token", method)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, CONTROL_ADMIN_ONLY)


def code_of(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return str(code)  # cygrpc may report a bare int on some versions


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, or None when the caller set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


# Calls that change what the server serves. With auth off they are answered only to loopback
# peers: an open port must not let anyone reload, load or unload models.
CONTROL_METHODS = ("/nextchar.v1.Admin/", "/inference.GRPCInferenceService/RepositoryModelLoad",
                   "/inference.GRPCInferenceService/RepositoryModelUnload")


def is_loopback_peer(peer: str) -> bool:
    """grpc peer strings: 'ipv4:127.0.0.1:5000', 'ipv6:%5B::1%5D:5000' (a URI: gRPC
    percent-encodes the brackets), 'unix:/path'."""
    peer = unquote(peer)
    if peer.startswith("unix:"):
        return True
    return is_loopback(peer.split(":", 1)[-1].rsplit(":", 1)[0].strip("[]"))


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def message(self) -> str:
        # protobuf's own text already says which: "String field had bad UTF-8" or "Wire
        # format was corrupt"; the hint points at the likely cause of each.
        text = str(self.error)
        hint = ("strings must be valid UTF-8" if "UTF-8" in text or
                isinstance(self.error, UnicodeDecodeError)
                else "the bytes are not this method's request message: is the client's .proto "
                     "the server's?")
        return f"request message does not decode: {text} ({hint})"


class UndecodableRequest(ServingError):
    """A frame of a request stream does not decode; the stream's handler raises it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


async def checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream whose undecodable frames raise UndecodableRequest (INVALID_ARGUMENT)."""
    async for request in requests:
        if type(request) is _Undecodable:
            raise UndecodableRequest(request.message())
        yield request


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def wrapped(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return _Undecodable(e)

    return wrapped


async def _abort_for(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Aborts with exc's code. grpc.aio keeps an aborted call's exception in a reference cycle
    until the next garbage collection, and with it every frame of its traceback and their
    locals: the request (a refused 15 MB request held ~250 MB each). So the traceback goes once
    logged, and the wrappers drop their `request` when the abort passes through them."""
    if isinstance(exc, ServingError):
        _drop_tracebacks(exc)
        await context.abort(exc.code, exc.message)
    log.error("unhandled error in %s", method, exc_info=exc)
    _drop_tracebacks(exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error (logged on the server)")


def _drop_tracebacks(exc: BaseException) -> None:
    """exc's traceback and those of the errors it was raised from (`raise ... from e`, or
    during their handling): each holds frames, and so the request they decoded."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]


async def _reject_undecodable(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _LoopbackOnly:
    """Auth's stand-in for control calls while auth is off."""

    async def check(self, context: grpc.aio.ServicerContext, method: str) -> None:
        if not is_loopback_peer(context.peer()):
            log.info("refused %s from %s: not loopback and auth is off", method, context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, CONTROL_LOOPBACK_ONLY)


class CallWrapper:
    def __init__(self, telemetry: Telemetry, auth: Auth | None,
                 admin_loopback_only: bool = False) -> None:
        self.telemetry = telemetry
        self.auth = auth
        self.admin_loopback_only = admin_loopback_only

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` with the layers its method needs (see the module docstring)."""
        tracked = self.telemetry.tracks(method)
        auth: Auth | _LoopbackOnly | None = (
            None if self.auth is None or self.auth.is_open(method) else self.auth)
        if auth is None and self.admin_loopback_only and method.startswith(CONTROL_METHODS):
            auth = _LoopbackOnly()
        # grpc-stubs types handlers for the sync server; under grpc.aio they are coroutines.
        inner: Any = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                      or handler.stream_stream)
        make = self._streaming if handler.response_streaming else self._unary
        decode = _safe_deserializer(handler.request_deserializer)
        # gRPC decodes a unary request before the handler runs: behind auth it arrives as bytes
        # and is decoded once its token is accepted, so a caller without one cannot make the
        # loop decode megabytes of message (~250 ms for 15 MB of texts) on every call. Request
        # streams are read, and decoded, by the handler itself, after the check.
        late = decode if auth is not None and not handler.request_streaming else None
        behavior = make(inner, method, tracked, auth, bool(handler.request_streaming), late)
        return _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))](
            behavior,
            request_deserializer=None if late is not None else decode,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, inner: Any, method: str, tracked: bool, auth: Auth | _LoopbackOnly | None,
               request_streaming: bool, late: Callable[[bytes], Any] | None) -> Any:
        telemetry = self.telemetry

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            seq = _enter(telemetry, context, method) if tracked else None
            if tracked and seq is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            started = time.perf_counter()
            code, detail = "OK", ""
            try:
                if auth is not None:
                    await auth.check(context, method)
                if late is not None:
                    request = late(request)
                if request_streaming:
                    request = checked_stream(request)
                elif type(request) is _Undecodable:  # no coroutine on the common path
                    await _reject_undecodable(context, request)
                try:
                    return await inner(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as e:
                    await _abort_for(context, e, method)
            except grpc.aio.AbortError:
                code, detail = code_of(context), context.details() or ""
                request = None  # see _abort_for
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                if seq is not None:
                    telemetry.exit(seq, method, code, started, detail=detail)

        return behavior

    def _streaming(self, inner: Any, method: str, tracked: bool,
                   auth: Auth | _LoopbackOnly | None,
                   request_streaming: bool, late: Callable[[bytes], Any] | None) -> Any:
        telemetry = self.telemetry
        gate = telemetry.gate

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            seq = _enter(telemetry, context, method) if tracked else None
            if tracked and seq is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            started = time.perf_counter()
            code, detail = "OK", ""
            try:
                if tracked:  # inside the try: a call cancelled during the send is still exited
                    # A stream's id also goes first: a client that cancels it gets no trailers.
                    await context.send_initial_metadata(
                        ((REQUEST_ID_HEADER, request_id_var.get() or ""),))
                if auth is not None:
                    await auth.check(context, method)
                if late is not None:
                    request = late(request)
                if request_streaming:
                    request = checked_stream(request)
                elif type(request) is _Undecodable:
                    await _reject_undecodable(context, request)
                try:
                    async for response in inner(request, context):
                        yield response
                        # A drain past its grace ends a stream at its next message; not at its
                        # last one (a GenerateResponse with a stop_reason): that stream is done.
                        if tracked and gate.streams_must_end and not getattr(
                                response, "stop_reason", 0):
                            code = "UNAVAILABLE"
                            await context.abort(grpc.StatusCode.UNAVAILABLE, STREAM_ENDED)
                except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as e:
                    await _abort_for(context, e, method)
            except grpc.aio.AbortError:
                code, detail = code_of(context), context.details() or ""
                request = None  # see _abort_for
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                if seq is not None:
                    telemetry.exit(seq, method, code, started, detail=detail)

        return behavior


def _enter(telemetry: Telemetry, context: grpc.aio.ServicerContext, method: str) -> int | None:
    """The request id in (metadata) and out (trailing metadata), then the shared bookkeeping."""
    supplied = traceparent = None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            supplied = value
        elif key == "traceparent" and isinstance(value, str):
            traceparent = value
    context.set_trailing_metadata(((REQUEST_ID_HEADER, telemetry.request_id(supplied)),))
    return telemetry.enter(method, "grpc", traceparent)


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A service found by name at call time (the path for methods not registered up front):
    wrapped on first use, then from a cache."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> None:
        self._inner = inner
        self._wrap = wrap
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None:
            return None
        cached = self._cache.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(details.method, handler))
            self._cache[details.method] = cached
        return cached[1]


class WrappingServer:
    """The two registration calls of generated `add_*Servicer_to_server` functions (and of
    health and reflection), forwarded to `server` with every handler wrapped."""

    def __init__(self, server: grpc.aio.Server, wrapper: CallWrapper) -> None:
        self._server = server
        self._wrap = wrapper.wrap

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(h, self._wrap) for h in handlers))

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        # grpcio >= 1.62 has it (the generated code calls it); grpc-stubs predates it.
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service, {name: self._wrap(f"/{service}/{name}", h) for name, h in handlers.items()})
