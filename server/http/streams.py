"""Server-sent event streams that answer a refusal as an HTTP status while they can.

A stream's first event waits for its first model call (admission to the queue, the prompt's
prefill); `opened(events)` awaits it before the 200 goes out, so a refusal until then (a full
queue, an expired deadline) is an ordinary error answer: 429 with retry-after, which clients
and SDKs retry, where an `error` event inside a 200 is not. Errors after it stay in-band.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator


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
