"""Server interceptors: domain errors -> gRPC status codes, in one place.

- ServingError subclasses carry their code and a message meant for the caller.
- Anything else is a bug: logged with its traceback, answered INTERNAL with a generic message,
  so no internal text reaches clients and the server stays up.
- A request that does not decode (e.g. a string field with invalid UTF-8) is answered
  INVALID_ARGUMENT instead of gRPC's default INTERNAL "Exception deserializing request!".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .errors import ServingError
from .security import bearer_token

log = logging.getLogger(__name__)


class _Undecodable:
    def __init__(self, error: Exception) -> None:
        self.error = error


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
    if isinstance(exc, ServingError):
        await context.abort(exc.code, exc.message)
    log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error (logged on the server)")


async def _reject_undecodable(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request message does not decode: {request.error} (strings must be valid UTF-8)",
    )


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # gRPC asks every interceptor for a handler on every call; the wrapped handler depends
        # only on the method's registered handler, so it is built once per method.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        # grpc-stubs types handlers for the sync server; under grpc.aio they are coroutines.
        if handler.unary_unary is not None:
            unary: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if type(request) is _Undecodable:  # no coroutine on the common path
                    await _reject_undecodable(context, request)
                try:
                    return await unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort_for(context, e, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream: Any = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if type(request) is _Undecodable:  # no coroutine on the common path
                    await _reject_undecodable(context, request)
                try:
                    async for response in stream(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort_for(context, e, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


def _reject_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers every call with `code`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kind = (bool(handler.request_streaming), bool(handler.response_streaming))
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return factory(
        streaming if handler.response_streaming else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


MISSING_TOKEN = ("missing bearer token: send metadata 'authorization: Bearer <token>' "
                 "(nextchar --token or NEXTCHAR_TOKEN)")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens (security.py): a call without an accepted token is answered UNAUTHENTICATED.

    `is_open(method)` names the methods answered without a token (health, reflection: settings).
    """

    def __init__(self, accepts: Callable[[str], bool], is_open: Callable[[str], bool]) -> None:
        self.accepts = accepts
        self.is_open = is_open
        self._refusals: dict[tuple[str, str], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self.is_open(details.method):
            return handler
        token = bearer_token(details.invocation_metadata)
        if token is None:
            return self._refusal(handler, details.method, MISSING_TOKEN)
        if not self.accepts(token):
            log.info("rejected a call to %s: token not accepted", details.method)
            return self._refusal(handler, details.method, "bearer token not accepted")
        return handler

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str, message: str) -> grpc.RpcMethodHandler:
        """One refusing handler per (method, message), so outer interceptors can cache theirs."""
        key = (method, message)
        if key not in self._refusals:
            self._refusals[key] = _reject_handler(handler, grpc.StatusCode.UNAUTHENTICATED, message)
        return self._refusals[key]
