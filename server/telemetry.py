"""Per-call bookkeeping, the outermost layer of every call on every front end (the gRPC call
wrapper, grpc/wrapping.py; the HTTP middleware): request id, drain gate, in-flight calls,
metrics. Transport-free: a front end passes the caller's request id in and sends the returned
one back (gRPC trailing metadata, an HTTP header).

For every call except health and reflection:
- the request id (the caller's `x-request-id` or a fresh one) is set for the call's logs and
  echoed in its trailing metadata, on success and on error alike;
- once the server drains, the call is refused with UNAVAILABLE before any work is done;
- an accepted call is tracked until it finishes: `stop()` waits for accepted calls, and a hot
  reload retires the old model only after every call that started before the swap finished;
- its status code and duration go to the metrics and to the access log (DEBUG; errors that are
  the server's fault are logged at ERROR by the error-mapping layer, interceptors.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .logging_setup import request_id_from, request_id_var
from .metrics import Metrics

if TYPE_CHECKING:
    from .tracing import CallTrace, Tracing

log = logging.getLogger(__name__)
access_log = logging.getLogger("nextchar.server.access")
# An HTTP error answer's message, for the access log line of its call (set where the body is
# made, http/errors.py; each request runs in its own task, so in its own context).
http_error_detail: contextvars.ContextVar[str] = contextvars.ContextVar("nextchar_http_error",
                                                                        default="")

# Always answered, never counted or refused: probes must see NOT_SERVING while draining.
UNTRACKED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

DRAINING_MESSAGE = "server is shutting down and takes no new work; retry on another replica"


class CallTracker:
    """Accepted calls by sequence number, so a waiter can ask for 'all calls begun before N'."""

    def __init__(self) -> None:
        self._next = 0
        self._active: set[int] = set()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    @property
    def count(self) -> int:
        return len(self._active)

    @property
    def next_seq(self) -> int:
        """The sequence number the next accepted call gets."""
        return self._next

    def begin(self) -> int:
        seq = self._next
        self._next += 1
        self._active.add(seq)
        return seq

    def end(self, seq: int) -> None:
        self._active.discard(seq)
        if self._waiters:
            keep = []
            for done, fut in self._waiters:
                if fut.done():
                    continue
                if done():
                    fut.set_result(None)
                else:
                    keep.append((done, fut))
            self._waiters = keep

    async def _wait(self, done: Callable[[], bool], timeout_s: float | None) -> bool:
        if done():
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((done, fut))
        try:
            await asyncio.wait_for(fut, timeout_s)
            return True
        except asyncio.TimeoutError:
            return done()

    async def wait_idle(self, timeout_s: float | None = None) -> bool:
        """True once no accepted call is running; False if timeout_s passed first."""
        return await self._wait(lambda: not self._active, timeout_s)

    async def wait_begun_before(self, seq: int, timeout_s: float | None = None) -> bool:
        """True once every call with a sequence number < seq finished."""
        return await self._wait(lambda: not any(s < seq for s in self._active), timeout_s)


class DrainGate:
    """draining: a drain began (health reports not ready; calls are still served through the
    pre-stop wait). closed: new calls are refused. streams_must_end: open streams end at their
    next message."""

    def __init__(self) -> None:
        self.draining = False
        self.closed = False
        self.streams_must_end = False


class Telemetry:
    """What the call wrapper (interceptors.py) does first and last on every tracked call."""

    def __init__(self, tracker: CallTracker, gate: DrainGate, metrics: Metrics | None,
                 tracing: Tracing | None = None, access_log: bool = False) -> None:
        self.tracker = tracker
        self.gate = gate
        self.metrics = metrics
        self.tracing = tracing
        # --access-log: every call at INFO; else at DEBUG, so that at the default level a
        # flood of refused calls cannot flood the log.
        self.access_level = logging.INFO if access_log else logging.DEBUG
        self._traces: dict[int, CallTrace] = {}  # by call sequence number, with tracing on

    @staticmethod
    def tracks(method: str) -> bool:
        return not method.startswith(UNTRACKED_PREFIXES)

    @staticmethod
    def request_id(supplied: str | None) -> str:
        """The call's request id (the caller's, if usable), set for its log lines."""
        request_id = request_id_from(supplied)
        request_id_var.set(request_id)
        return request_id

    def enter(self, method: str, protocol: str = "grpc",
              traceparent: str | None = None) -> int | None:
        """None while draining (the front end refuses the call with DRAINING_MESSAGE); else
        tracks the call and returns its sequence number. With tracing on, the call's SERVER
        span starts here (child of `traceparent`, the caller's W3C trace context)."""
        if self.gate.closed:  # counted in the protocol's own codes, as every other answer
            self._finish(method, "503" if protocol == "http" else "UNAVAILABLE", 0.0, protocol)
            return None
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        seq = self.tracker.begin()
        if self.tracing is not None:
            self._traces[seq] = self.tracing.start_call(method, protocol, traceparent)
        return seq

    def exit(self, seq: int, method: str, code: str, started: float,
             protocol: str = "grpc", detail: str = "") -> None:
        """`detail`: a refused or failed call's message, for the access log."""
        # Counted before the in-flight gauge drops: a scrape seeing 0 in flight sees every count.
        self._finish(method, code, time.perf_counter() - started, protocol, detail)
        if self.metrics is not None:
            self.metrics.in_flight.dec()
        if self.tracing is not None:
            self.tracing.end_call(self._traces.pop(seq, None), code)
        self.tracker.end(seq)

    def _finish(self, method: str, code: str, duration_s: float, protocol: str,
                detail: str = "") -> None:
        if self.metrics is not None:
            self.metrics.observe_request(method.lstrip("/"), code, duration_s, protocol)
        if access_log.isEnabledFor(self.access_level):
            access_log.log(self.access_level, "%s %s %.1f ms%s", method.rsplit("/", 1)[-1],
                           code, duration_s * 1e3, f": {detail}" if detail else "",
                           extra={"method": method, "code": code, "protocol": protocol,
                                  "duration_ms": round(duration_s * 1e3, 3),
                                  **({"detail": detail} if detail else {})})
