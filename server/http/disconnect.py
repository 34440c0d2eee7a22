"""A non-streaming answer that takes a while (a completion of thousands of characters) ends when
its caller leaves, as a cancelled gRPC call does: the streams it holds are closed at once, so
their slots (max_streams) and the model's time go to callers still waiting. A streaming answer
needs none of this: Starlette's StreamingResponse watches for the disconnect itself and stops
iterating."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

T = TypeVar("T")

# nginx's "client closed request": nobody reads it, but the access log and the metrics do.
CLIENT_GONE = 499


class ClientGone(Exception):
    """The caller disconnected before the answer was ready; the work was cancelled."""


async def _disconnected(request: Request) -> None:
    # The body is read by now: the next message the server gives is http.disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone (and `work` cancelled) if the caller leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done():  # the caller left first, or watching failed
        await asyncio.gather(task, return_exceptions=True)  # let its cleanup run now
        if watch.done() and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()  # type: ignore[misc]
        raise ClientGone
    return task.result()


def gone_response() -> Response:
    return Response(status_code=CLIENT_GONE)
