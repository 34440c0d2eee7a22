"""Server-sent event streams that answer a refusal as an HTTP status while they can.

A stream's first event waits for its first model call (admission to the queue, the prompt's
prefill); `opened(events)` awaits it before the 200 goes out, so a refusal until then (a full
queue, an expired deadline) is an ordinary error answer: 429 with retry-after, which clients
and SDKs retry, where an `error` event inside a 200 is not. Errors after it stay in-band.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator

from ..errors import ServingError
from .errors import error_body

log = logging.getLogger(__name__)


def error_event(path: str, e: Exception) -> bytes:
    """The in-band `error` event for an error after a stream's first event, in the route's
    error shape: a ServingError's status and message; anything else (a backend failing
    mid-stream) is logged here and sent as a 500 without internals, so the stream still ends
    with an event a client reads rather than a cut connection."""
    if isinstance(e, ServingError):
        return b"data: " + error_body(path, e.http_status, e.message) + b"\n\n"
    log.error("unhandled error in a stream after its first event", exc_info=e)
    return b"data: " + error_body(path, 500, "internal server error (logged on the server)") \
        + b"\n\n"


async def opened(events: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """`events` with its first event already come; raises what it raised before that."""
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    return _after(first, events)


async def _after(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await rest.aclose()  # a client gone mid-stream: what `rest` holds ends now
