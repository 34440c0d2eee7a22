"""Every HTTP call's outer layer, one pure ASGI middleware (no per-call task or body copy), in
order:

1. request id: the caller's `x-request-id` (or a fresh one) is set for the call's log lines and
   sent back as the `x-request-id` response header, errors included;
2. health (`/v2/health/*`) is answered as it is, untracked, so probes see not-ready during a
   drain; every other call goes through the shared telemetry (../telemetry.py): refused with
   503 + Retry-After once the drain gate closes, tracked until it ends (drain and hot reload
   wait for it), counted in the metrics with protocol="http" and written to the access log;
3. bearer tokens (../security.py TokenSet), health open unless --no-auth-open-health; 401;
4. limits: a body over max_message_bytes is 413 (Content-Length, or counted as it arrives,
   after decompression: Content-Encoding gzip and deflate are read, as Triton does, anything
   else is 415); a body that stalls (nothing for --http-body-timeout-s) is 408;
5. deadline: `x-request-timeout-ms` becomes the call's deadline on the loop's clock, as a gRPC
   deadline does (handlers read `request.state.deadline`);
6. anything that escapes the app is logged once and answered 500 without internal text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

from ..logging_setup import REQUEST_ID_HEADER
from ..security import CONTROL_ADMIN_ONLY, TokenSet
from ..telemetry import DRAINING_MESSAGE, Telemetry, http_error_detail
from .errors import INTERNAL, BodyRefused, BodyTimeout, BodyTooLarge, error_body, error_headers

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TIMEOUT_HEADER = b"x-request-timeout-ms"
HEALTH_PREFIX = "/v2/health/"
MISSING_TOKEN = "missing bearer token: send the header 'Authorization: Bearer <token>'"
BAD_TOKEN = "bearer token not accepted"

# Metric and access-log names: the route's template, never the raw path (bounded labels).
_ROUTES = [(re.compile(p), t) for p, t in (
    (r"/v2", "/v2"),
    (r"/v2/health/(live|ready)", r"/v2/health/\1"),
    (r"/v2/models/stats", "/v2/models/stats"),
    (r"/v2/models/[^/]+(/versions/[^/]+)?", "/v2/models/{name}"),
    (r"/v2/models/[^/]+(/versions/[^/]+)?/(ready|infer|config|stats)", r"/v2/models/{name}/\2"),
    (r"/v2/repository/index", "/v2/repository/index"),
    (r"/v2/repository/models/[^/]+/(load|unload)", r"/v2/repository/models/{name}/\1"),
    (r"/v1/models", "/v1/models"),
    (r"/v1/models/[^/]+", "/v1/models/{model}"),
    (r"/v1/(completions|chat/completions)", r"/v1/\1"),
    (r"/nextchar/v1/(predict|generate|models)", r"/nextchar/v1/\1"),
    (r"/nextchar/v1/models/[^/]+", "/nextchar/v1/models/{model}"),
    (r"/openapi.json", "/openapi.json"),
)]


# Model control over HTTP (Triton's repository extension); gRPC's: wrapping.CONTROL_METHODS.
_CONTROL_PATH = re.compile(r"/v2/repository/models/[^/]+/(load|unload)")

_LABELS: dict[tuple[str, str], str] = {}
_MAX_LABELS = 4096


def route_label(method: str, path: str) -> str:
    key = (method, path)
    label = _LABELS.get(key)
    if label is not None:
        return label
    label = f"{method} (unknown)"
    for pattern, template in _ROUTES:
        m = pattern.fullmatch(path)
        if m is not None:
            label = f"{method} {m.expand(template)}"
            break
    if len(_LABELS) >= _MAX_LABELS:  # random paths must not grow it without bound
        _LABELS.clear()
    _LABELS[key] = label
    return label


def _bearer(value: bytes | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class CallLayer:
    def __init__(self, app: ASGIApp, telemetry: Telemetry, tokens: TokenSet | None,
                 open_health: bool, max_body_bytes: int, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.telemetry = telemetry
        self.tokens = tokens
        self.open_health = open_health
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            # Every GET route answers HEAD too (RFC 9110 9.3.2; load balancers probe with it):
            # the app runs the GET, the server sends its headers and no body.
            scope = {**scope, "method": "GET", "nextchar.method": "HEAD"}
            send = _headers_only(send)
        path: str = scope["path"]
        headers: dict[bytes, bytes] = dict(scope["headers"])
        telemetry = self.telemetry
        request_id = telemetry.request_id(
            headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1") or None)
        id_header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        status = [0]
        ended = [False]  # the response's last body message went out

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended[0] = True
            await send(message)

        health = path.startswith(HEALTH_PREFIX)
        if health and (self.tokens is None or self.open_health):
            await self._run(scope, receive, send_with_id, status, [False], None)
            return
        method = route_label(scope.get("nextchar.method", scope["method"]), path)
        traceparent = headers.get(b"traceparent")
        seq = None if health else telemetry.enter(
            method, "http", traceparent.decode("latin-1") if traceparent else None)
        if seq is None and not health:
            await _answer(send_with_id, path, 503, DRAINING_MESSAGE)
            return
        started = time.perf_counter()
        try:
            refusal = self._refusal(headers, path)
            if refusal is not None:
                await _answer(send_with_id, path, *refusal)
                return
            await self._run(scope, self._limited(receive, _encoding(headers)), send_with_id,
                            status, ended, headers.get(TIMEOUT_HEADER))
        finally:
            if seq is not None:
                # 499 (nginx's "client closed request") also for a response the client left
                # before its end (an SSE stream): its 200 went out, its answer did not.
                code = str(status[0]) if status[0] and ended[0] else "499"
                telemetry.exit(seq, method, code, started, "http", http_error_detail.get())

    def _refusal(self, headers: dict[bytes, bytes], path: str) -> tuple[int, str] | None:
        if self.tokens is not None:
            token = _bearer(headers.get(b"authorization"))
            if token is None:
                return 401, MISSING_TOKEN
            if not self.tokens.accepts(token):
                log.info("rejected an HTTP call to %s: token not accepted", path)
                return 401, BAD_TOKEN
            if self.tokens.restricts_control and _CONTROL_PATH.fullmatch(path) \
                    and not self.tokens.may_control(token):
                log.info("refused %s: the token is not an admin token", path)
                return 403, CONTROL_ADMIN_ONLY
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return 400, "Content-Length is not a number"
            if size > self.max_body_bytes:
                return 413, (f"request body of {size} bytes > max_message_bytes "
                             f"{self.max_body_bytes}")
        encoding = _encoding(headers)
        if encoding not in ENCODINGS:
            return 415, (f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not "
                         f"supported: send the body as is, gzip or deflate")
        timeout = headers.get(TIMEOUT_HEADER)
        if timeout is not None:
            try:
                ms = float(timeout)
            except ValueError:
                ms = -1.0
            if not (math.isfinite(ms) and ms > 0):
                return 400, (f"x-request-timeout-ms must be a positive number of milliseconds, "
                             f"got {timeout.decode('latin-1')!r}")
        return None

    def _limited(self, receive: Receive, encoding: bytes) -> Receive:
        """receive() with the body's limits applied, decompressed (gzip, deflate) if it is."""
        limit, timeout_s = self.max_body_bytes, self.body_timeout_s
        wbits = ENCODINGS[encoding]  # _refusal answered 415 for any other
        inflater = None if wbits is None else _Inflater(wbits, limit)
        seen = 0  # bytes of the body as the app gets it (decompressed)
        complete = False

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # after the body, receive() waits for a disconnect: no time limit
                return await receive()
            try:
                message = await _within(receive(), timeout_s)
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the request body stalled: nothing arrived for {timeout_s:g}s "
                                  f"after {inflater.raw if inflater else seen} bytes "
                                  f"(--http-body-timeout-s); send the whole body promptly"
                                  ) from None
            if message["type"] != "http.request":  # http.disconnect
                complete = True
                return message
            body = message.get("body", b"")
            complete = not message.get("more_body", False)
            if inflater is not None:
                body = await inflater.feed(body, complete)
                message = {**message, "body": body}
            seen += len(body)
            if seen > limit:
                raise BodyTooLarge(f"request body over max_message_bytes {limit}")
            return message

        return counted

    async def _run(self, scope: Scope, receive: Receive, send: Send, status: list[int],
                   ended: list[bool], timeout: bytes | None) -> None:
        state = scope.setdefault("state", {})
        state["deadline"] = (None if timeout is None else
                             asyncio.get_running_loop().time() + float(timeout) / 1e3)
        try:
            await self.app(scope, receive, send)
        except Exception as e:
            # The app's own 500 handler answered already (Starlette re-raises after it).
            if status[0] == 0:
                log.error("unhandled error in %s %s", scope["method"], scope["path"], exc_info=e)
                await _answer(send, scope["path"], 500, INTERNAL)
            elif status[0] < 500 and not isinstance(e, (ClientDisconnect, OSError)):
                # Failed after its status went out (a stream's body): a server error, not
                # the client's close the unfinished body would otherwise be counted as.
                log.error("unhandled error in %s %s after its response began", scope["method"],
                          scope["path"], exc_info=e)
                status[0], ended[0] = 500, True


# Content-Encoding -> zlib's wbits (None: as is). 32 + 15 reads a zlib or a gzip wrapper: HTTP's
# "deflate" is zlib-wrapped (RFC 9110), and some clients send gzip under that name.
ENCODINGS: dict[bytes, int | None] = {b"identity": None, b"gzip": 16 + 15, b"x-gzip": 16 + 15,
                                      b"deflate": 32 + 15}


def _encoding(headers: dict[bytes, bytes]) -> bytes:
    return headers.get(b"content-encoding", b"identity").strip().lower()


INFLATE_STEP = 1 << 20  # bytes of output per step; a big inflation yields the loop between
AFTER_THE_END = ("the request body goes on after the end of its compressed stream (send one "
                 "gzip member or zlib stream)")


class _Inflater:
    """One body's decompression, bounded both ways: at most `limit` bytes in (compressed, so an
    endless stream of empty blocks ends too) and out (a bomb stops there), 413 past either; a
    body that does not decompress, ends inside its stream, or goes on after its end is 400."""

    def __init__(self, wbits: int, limit: int) -> None:
        self._d = zlib.decompressobj(wbits)
        self._limit = limit
        self.raw = 0
        self._out = 0

    async def feed(self, data: bytes, last: bool) -> bytes:
        self.raw += len(data)
        if self.raw > self._limit:
            raise BodyTooLarge(f"request body over max_message_bytes {self._limit}")
        d, pending = self._d, data
        parts: list[bytes] = []
        try:
            while pending or (parts and len(parts[-1]) == INFLATE_STEP):
                if d.eof:  # data in a later piece
                    raise BodyRefused(AFTER_THE_END)
                part = d.decompress(pending, min(self._limit - self._out + 1, INFLATE_STEP))
                self._out += len(part)
                if self._out > self._limit:
                    raise BodyTooLarge(f"request body over max_message_bytes {self._limit}")
                parts.append(part)
                pending = d.unconsumed_tail
                if d.eof and (pending or d.unused_data):  # in this piece
                    raise BodyRefused(AFTER_THE_END)
                await asyncio.sleep(0)  # other calls run between steps of a big body
        except zlib.error as e:
            raise BodyRefused(f"the request body does not decompress as its Content-Encoding "
                              f"says: {e}") from None
        if last and not d.eof:
            raise BodyRefused("the request body ends inside its compressed stream (truncated)")
        return b"".join(parts)


# asyncio.timeout (3.11+) is a timer on the running task; wait_for makes a task per receive.
_timeout = getattr(asyncio, "timeout", None)


async def _within(awaitable: Awaitable[Message], timeout_s: float) -> Message:
    if _timeout is None:
        return await asyncio.wait_for(awaitable, timeout_s)
    async with _timeout(timeout_s):
        return await awaitable


def _headers_only(send: Send) -> Send:
    async def head(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            message = {**message, "body": b""}
        await send(message)

    return head


async def _answer(send: Send, path: str, status: int, message: str) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.encode(), v.encode()) for k, v in error_headers(status).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": error_body(path, status, message)})
