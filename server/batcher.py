"""Dynamic batcher: merges the texts of concurrent requests into few backend calls.

    items -> a bounded queue per priority lane -> dispatcher (event loop) -> executor threads
          <- futures resolved with each item's `finish` result, computed on the worker thread

The batcher schedules; it does not know what a caller wants from the model's outputs. Each
item carries a `finish(out, rows, items)` that turns one model call's BatchOutput rows into
that caller's results (top-k for Predict, the distribution for KServe, logits and state for a
Generate prefill); it runs on the worker thread, off the event loop.

Entries: `submit` (items through the queues), `submit_steps` (Generate's step chain, on a
worker between batches), `run_model` (a model call from inside such a step),
`wait_for_prompts` (a step letting the prompts of new streams go first), `probe` (one direct
call on the executor: warm-up checks and the reload probe).

- Priority lanes: HIGH (interactive) is always taken before LOW (batch jobs); each lane has its
  own queue bound and default queue timeout (Triton's priority_levels + ModelQueuePolicy). When
  the backend has several workers, LOW-only batches use at most `low_lane_workers` of them
  (default: all but one) while interactive calls come in, so a high-lane text never waits
  behind a batch job's model call; after HIGH_IDLE_S without any, a batch job alone on the
  server gets every worker (the first interactive call then waits at most for one low batch).

- Greedy by default: when a worker frees up it takes everything queued (up to
  `max_batch_size` texts and `max_batch_chars` padded characters), so low load pays no wait;
  `max_batch_delay_ms` > 0 waits that long to fill a batch.
- One batch at a time unless there is a lot to do: while a model call runs, another worker
  starts only once `parallel_batch_chars` characters are queued. Two workers taking turns on a
  trickle of single texts would each run tiny batches (per character the loop graph is ~2x
  cheaper at batch 64 than at batch 1) and take CPU the event loop needs; batch jobs still get
  every worker (docs/benchmarks.md, "What closed the p99 gap").
- Bounded: more than a lane's `max_queue_texts` waiting -> Overloaded (RESOURCE_EXHAUSTED).
- Deadline-aware: an item whose deadline passed while queued is answered DEADLINE_EXCEEDED
  without compute; an item whose caller went away (future cancelled) is dropped.
- Length-grouped: a taken batch is sorted by length and split where lengths differ by more than
  2x, bounding padding waste to < 50% of any backend call.
- With batching off, each request's texts form their own backend call(s): the naive server the
  benchmarks compare against.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .backends.base import Backend, BatchOutput
from .errors import DeadlineExceeded, NotReady, Overloaded

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger(__name__)

HIGH, LOW = 0, 1
LANE_NAMES = ("high", "low")
HIGH_IDLE_S = 0.5  # no high-lane text for this long: the low lane may use every worker

# finish(out, rows, items) -> one result per item: items[i] is row rows[i] of `out`.
Finish = Callable[[BatchOutput, np.ndarray, Sequence["Item"]], list[Any]]


@dataclass
class Item:
    ids: np.ndarray  # (T,) int64
    future: asyncio.Future[Any]
    finish: Finish
    params: Any = None  # what `finish` needs per item (e.g. top_k)
    deadline: float | None = None  # loop.time() seconds
    positions: bool = False  # the model call must compute position logits
    state: np.ndarray | None = None  # (S, H) start state; None = zeros
    lane: int = HIGH
    enqueued_at: float = field(default_factory=time.monotonic)
    trace: Any = None  # the call's CallTrace (tracing.py) when traced
    enqueued_ns: int = 0  # wall clock, for the queue span (traced items only)
    ahead: bool = False  # its batch runs before queued submit_steps work (a Generate prefill)


@dataclass(frozen=True)
class LanePolicy:
    max_queue_texts: int = 8192
    timeout_s: float = 0.0  # queue timeout for items without a deadline; 0: none
    max_queue_chars: int = 1 << 20  # characters waiting: the queue's compute, bounded
    max_batch_size: int = 0  # texts per model call from this lane; 0: the batcher's


@dataclass
class BatchStats:
    """Counters the benchmarks and metrics read."""

    batches: int = 0
    texts: int = 0
    chars: int = 0
    padded_chars: int = 0
    expired: int = 0
    cancelled: int = 0
    rejected: int = 0
    failed: int = 0  # texts whose model call raised
    compute_ns: int = 0


def group_by_length(items: list[Item]) -> list[list[Item]]:
    """Sorts by length and splits so each group's longest text is <= 2x its shortest."""
    items = sorted(items, key=lambda it: len(it.ids))
    groups: list[list[Item]] = []
    for it in items:
        if groups and len(it.ids) <= 2 * len(groups[-1][0].ids):
            groups[-1].append(it)
        else:
            groups.append([it])
    return groups


class Batcher:
    def __init__(
        self,
        backend: Backend,
        *,
        batching: bool = True,
        max_batch_size: int = 256,
        max_batch_chars: int = 65536,
        max_batch_delay_ms: float = 0.0,
        max_queue_texts: int = 8192,
        max_queue_chars: int = 1 << 20,
        parallel_batch_chars: int = 0,
        low_lane: LanePolicy | None = None,
        high_timeout_s: float = 0.0,
        low_lane_workers: int = 0,
        low_lane_nice: int = 0,
        worker_nice: int = 0,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_batch_start: Callable[[list[float]], None] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.backend = backend
        self.tracing = tracing
        self.batching = batching
        self.max_batch_size = max_batch_size
        self.max_batch_chars = max_batch_chars
        self.max_batch_delay_s = max_batch_delay_ms / 1000.0
        self.lanes = (LanePolicy(max_queue_texts, high_timeout_s, max_queue_chars),
                      low_lane or LanePolicy(max_queue_texts, max_queue_chars=max_queue_chars))
        self.max_queue_texts = max_queue_texts
        self.parallel_batch_chars = parallel_batch_chars
        workers = backend.workers
        self.low_lane_workers = min(workers, low_lane_workers or max(1, workers - 1))
        self._last_high = -HIGH_IDLE_S  # time.monotonic() of the last high-lane submit
        self.on_batch = on_batch  # (texts, padded chars, compute seconds) -> None
        self.on_batch_start = on_batch_start  # (each text's enqueued_at) -> None: queue time
        self.stats = BatchStats()
        # Model calls and Generate steps a little nicer than the event loop: on a machine with
        # fewer cores than busy threads, the loop (accepting calls, reading requests, sending
        # answers) gets a core first, and the model works on bigger batches meanwhile
        # (docs/benchmarks.md, "Worker priority"). Low-lane model calls run on threads of
        # their own, nicer still: on a machine whose cores the batch job keeps busy, the
        # threads of an interactive call get a core first instead of sharing it with the job's
        # call. Only with several workers: one worker runs both lanes' calls in turn.
        # Nice values are per thread on Linux and a new thread inherits its creator's, so every
        # thread is started here, from this one, and set to an absolute value: a main worker
        # started lazily by a low-lane thread would otherwise run at the low lane's priority
        # (and could not be raised back without privilege). Starting them takes well under a
        # millisecond, once per model version.
        base = _own_nice()
        self.executor = backend.make_executor(
            functools.partial(_set_nice, min(19, base + worker_nice)) if worker_nice > 0 else None)
        _start_threads(self.executor, backend.workers)
        self._low_executor: ThreadPoolExecutor | None = None
        if low_lane_nice > 0 and backend.workers > 1:
            self._low_executor = ThreadPoolExecutor(
                max_workers=backend.workers, thread_name_prefix=f"nextchar-{backend.name}-low",
                initializer=_set_nice, initargs=(min(19, base + low_lane_nice),))
            _start_threads(self._low_executor, backend.workers)
        self._queues: tuple[deque[Item], deque[Item]] = (deque(), deque())  # by lane
        self._pending_chars = 0  # characters in both queues (live or not yet dropped)
        self._lane_chars = [0, 0]  # the same, per lane
        self._running = 0  # workers busy with batches
        self._running_high = 0  # of those, batches holding high-lane items
        # Guards _queues, _pending_chars, _running(_high) and _closed, which the loop and the
        # worker threads both change (workers pull their next batch themselves).
        self._lock = threading.Lock()
        self._jobs_waiting = 0  # submit_steps() work queued behind the batches (Generate steps)
        # Generate prompts (Item.ahead) queued, and taken into batches not yet finished; steps
        # in wait_for_prompts() sleep on the condition, notified as these fall.
        self._prompts_queued = 0
        self._prompts_taken = 0
        self._prompts_changed = threading.Condition(self._lock)
        self._step_waiters = 0
        self._in_flight_texts = 0  # batching off: texts handed to workers but not done
        self._slots = asyncio.Semaphore(backend.workers)  # batching off: one call per worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._delay: asyncio.TimerHandle | None = None  # max_batch_delay_ms timer, when armed
        self._delay_over = False
        self._dispatch_soon = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads the model on the executor (its threads own it); the runtime warms it up."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.backend.prepare)
        self._loop = loop

    async def close(self) -> None:
        """Stops taking work; fails what is still queued; waits for running batches (on a
        helper thread: the event loop keeps serving the other models meanwhile)."""
        with self._lock:
            self._closed = True
            queued = [*self._queues[HIGH], *self._queues[LOW]]
            for q in self._queues:
                q.clear()
            self._pending_chars = 0
            self._lane_chars = [0, 0]
            self._prompts_queued = 0
            self._prompts_changed.notify_all()
        if self._delay is not None:
            self._delay.cancel()
        for it in queued:
            if not it.future.done():
                it.future.set_exception(NotReady("server is shutting down"))
        await asyncio.to_thread(self.executor.shutdown, wait=True)
        if self._low_executor is not None:
            await asyncio.to_thread(self._low_executor.shutdown, wait=True)

    @property
    def queue_depth(self) -> int:
        return len(self._queues[HIGH]) + len(self._queues[LOW]) + self._in_flight_texts

    def lane_depth(self, lane: int) -> int:
        """Texts queued in one lane (batching off: texts in the model count as high-lane)."""
        return len(self._queues[lane]) + (self._in_flight_texts if lane == HIGH else 0)

    async def probe(self, ids: np.ndarray, lengths: np.ndarray, state: np.ndarray,
                    positions: bool = True) -> BatchOutput:
        """One model call on the backend's executor, outside the queues (the reload probe)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, lambda: self.backend.run(ids, lengths, state, positions=positions))

    def run_model(self, ids: np.ndarray, lengths: np.ndarray, state: np.ndarray) -> BatchOutput:
        """A model call from inside `submit_steps` work (already on a worker thread)."""
        started = time.perf_counter()
        out = self.backend.run(ids, lengths, state)
        if self.on_batch is not None:
            self.on_batch(len(ids), int(ids.size), time.perf_counter() - started)
        return out

    def submit_steps(self, fn: Callable[..., object], *args: object) -> None:
        """Runs fn(*args) on a backend worker between batches (Generate's steps): a worker
        pulling batch after batch lets it go first, so a stream of Predict batches cannot
        starve it; only a batch holding a Generate prompt (Item.ahead) goes before it.
        RuntimeError once the executor is shut down."""
        with self._lock:
            self._jobs_waiting += 1

        def run() -> None:
            with self._lock:
                self._jobs_waiting -= 1
            fn(*args)

        try:
            self.executor.submit(run)
        except RuntimeError:
            with self._lock:
                self._jobs_waiting -= 1
            raise

    def wait_for_prompts(self, timeout_s: float, stepping: int) -> None:
        """From `submit_steps` work: blocks this worker thread while at least `stepping`
        Generate prompts (Item.ahead) are queued or in a model call, that is while a step over
        `stepping` streams would advance no more streams than wait for their first
        character; for at most timeout_s. Returns at once when no other worker would be free
        to run the prompts (one worker, or the others waiting here too).

        Why: on a machine with fewer cores than busy threads, a step running beside the
        prompts of a burst of new streams takes the core that admitting and prefilling them
        needs; a new stream's first character waits for both (docs/benchmarks.md, "The first
        character")."""
        if timeout_s <= 0:
            return

        def fewer() -> bool:
            return self._closed or self._prompts_queued + self._prompts_taken < stepping

        with self._lock:
            if fewer() or self._step_waiters >= self.backend.workers - 1:
                return
            self._step_waiters += 1
            try:
                self._prompts_changed.wait_for(fewer, timeout_s)
            finally:
                self._step_waiters -= 1

    # -- submission --------------------------------------------------------------------------
    async def submit(self, items: list[Item]) -> list[Any]:
        """Queues the items of one request (all of one lane) and waits for their results."""
        if self._closed:
            raise NotReady("server is shutting down")
        lane = items[0].lane
        if lane == HIGH:
            self._last_high = time.monotonic()
        policy = self.lanes[lane]
        queued = len(self._queues[lane]) + self._in_flight_texts
        if len(items) > policy.max_queue_texts:
            # Never fits, idle or not (a --low-max-queue-texts under a job's request size):
            # say what would, rather than "retry with backoff" for good.
            self.stats.rejected += 1
            raise Overloaded(
                f"server overloaded: a request of {len(items)} texts is more than the "
                f"{LANE_NAMES[lane]}-priority lane queues, limit {policy.max_queue_texts} "
                f"(GetModelInfo limits); send at most {policy.max_queue_texts} texts per request")
        if queued + len(items) > policy.max_queue_texts:
            self.stats.rejected += 1
            raise Overloaded(
                f"server overloaded: {queued} texts queued in the {LANE_NAMES[lane]}-priority "
                f"lane, limit {policy.max_queue_texts}; retry with backoff"
            )
        chars = sum(len(it.ids) for it in items)
        if self._lane_chars[lane] and self._lane_chars[lane] + chars > policy.max_queue_chars:
            self.stats.rejected += 1
            raise Overloaded(
                f"server overloaded: {self._lane_chars[lane]} characters queued in the "
                f"{LANE_NAMES[lane]}-priority lane, limit {policy.max_queue_chars}; retry with "
                f"backoff")
        if self.tracing is not None and (call := self.tracing.current_call()) is not None:
            now_ns = time.time_ns()
            for it in items:
                it.trace, it.enqueued_ns = call, now_ns
        if policy.timeout_s > 0:
            limit = asyncio.get_running_loop().time() + policy.timeout_s
            for it in items:
                if it.deadline is None or it.deadline > limit:
                    it.deadline = limit
        if not self.batching:
            return await self._run_unbatched(items)
        prompts = sum(it.ahead for it in items)
        with self._lock:
            self._queues[lane].extend(items)
            self._pending_chars += chars
            self._lane_chars[lane] += chars
            self._prompts_queued += prompts
        if not self._dispatch_soon:  # once per loop pass: requests arriving together batch
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self._dispatch)
        try:
            if len(items) == 1:  # the common single-text call: no gather future to build
                return [await items[0].future]
            return list(await asyncio.gather(*(it.future for it in items)))
        except BaseException:
            # The caller is gone or one text failed: the siblings need no compute either.
            for it in items:
                it.future.cancel()
            raise

    async def _run_unbatched(self, items: list[Item]) -> list[Any]:
        loop = asyncio.get_running_loop()
        self._in_flight_texts += len(items)
        try:
            async with self._slots:
                live, expired = self._split_dead(items, loop.time())
                _expire(expired)
                for group in group_by_length(live):
                    for chunk in self._chunks(group):
                        _deliver(chunk, *await loop.run_in_executor(
                            self.executor, self._run_batch, chunk))
        finally:
            self._in_flight_texts -= len(items)
        return list(await asyncio.gather(*(it.future for it in items)))

    # -- dispatching -------------------------------------------------------------------------
    # Workers pull: a worker that finishes a batch hands its answers to the event loop and takes
    # the next batch itself, under the lock, without waiting for the loop. The loop only starts
    # idle workers (_dispatch), at the end of a pass in which texts were queued (so texts that
    # arrive together share a call) and when the delay timer fires. Why: a callback from a
    # worker thread runs only after everything already queued on the loop, which under load is
    # a pass that answers and reads dozens of calls; a model thread waiting for the loop's
    # go-ahead sat idle all that time (docs/benchmarks.md, "The batcher's hand-over").
    def _may_start(self, others: int, others_high: int) -> bool:
        """With the lock held: may a worker start a batch while `others` batches run
        (`others_high` of them with high-lane items)?"""
        if self._closed or others >= self.backend.workers:
            return False
        if self._queues[HIGH]:
            # High-lane work never waits for a batch job's call to end (the reserved worker);
            # behind a high-lane call, a second one only for a big enough queue.
            return not others_high or self._pending_chars >= self.parallel_batch_chars
        if not self._queues[LOW] or others >= self._low_limit():
            return False
        return not others or self._pending_chars >= self.parallel_batch_chars

    def _low_limit(self) -> int:
        """Workers low-lane batches may use now: all of them when no interactive call came
        for HIGH_IDLE_S, else low_lane_workers."""
        if time.monotonic() - self._last_high > HIGH_IDLE_S:
            return self.backend.workers
        return self.low_lane_workers

    def _wants_delay(self) -> bool:
        """With max_batch_delay_ms, a batch that is not full waits for the loop's timer."""
        return (self.max_batch_delay_s > 0
                and len(self._queues[HIGH]) + len(self._queues[LOW]) < self.max_batch_size
                and not self._delay_over)

    def _dispatch(self) -> None:
        """On the loop: starts idle workers on what is queued."""
        self._dispatch_soon = False
        loop = self._loop
        assert loop is not None, "Batcher.start() was not awaited"
        while True:
            with self._lock:
                if not self._may_start(self._running, self._running_high):
                    return
                if self._wants_delay():
                    if self._delay is None:
                        self._delay = loop.call_later(self.max_batch_delay_s, self._end_delay)
                    return
                if self._delay is not None:
                    self._delay.cancel()
                self._delay = None
                batch, expired, high = self._take(loop.time(), self._running)
                if batch:
                    self._running += 1
                    self._running_high += high
            _expire(expired)
            if batch:
                self._executor_for(high).submit(self._work, batch, high, loop)

    def _end_delay(self) -> None:
        self._delay = None
        self._delay_over = True
        self._dispatch()

    def _split_dead(self, items: list[Item], now: float) -> tuple[list[Item], list[Item]]:
        """(live, expired); drops the cancelled. Counts both; safe off the loop (sets nothing)."""
        live, expired = [], []
        for it in items:
            if it.future.done():  # cancelled by a caller that went away
                self.stats.cancelled += 1
            elif it.deadline is not None and now >= it.deadline:
                self.stats.expired += 1
                expired.append(it)
            else:
                live.append(it)
        return live, expired

    def _take(self, now: float, others: int) -> tuple[list[Item], list[Item], int]:
        """With the lock held: pops up to max_batch_size live items within the padded-chars
        budget, FIFO, from the high lane or, when it holds none, the low lane (a batch never
        mixes lanes: low-lane texts would make an interactive call longer). Returns them, the
        expired ones it popped (to be answered), and 1 for a high-lane batch, else 0."""
        taken: list[Item] = []
        expired: list[Item] = []
        self._delay_over = False  # a delay, if one ran, applied to this batch
        for lane, queue in enumerate(self._queues):
            if lane == LOW and others >= self._low_limit():
                break
            longest = 0
            limit = self.lanes[lane].max_batch_size or self.max_batch_size
            while queue and len(taken) < limit:
                it = queue[0]
                live, dead = self._split_dead([it], now)
                if not live:
                    expired += dead
                    n = len(queue.popleft().ids)
                    self._pending_chars -= n
                    self._lane_chars[lane] -= n
                    if it.ahead:
                        self._prompt_left(False)
                    continue
                t = max(longest, len(it.ids))
                if taken and t * (len(taken) + 1) > self.max_batch_chars:
                    break
                longest = t
                taken.append(queue.popleft())
                self._pending_chars -= len(it.ids)
                self._lane_chars[lane] -= len(it.ids)
                if it.ahead:
                    self._prompt_left(True)
            if taken:
                return taken, expired, int(lane == HIGH)
        return taken, expired, 0

    def _prompt_left(self, taken: bool) -> None:
        """With the lock held: a prompt left the queue, into a batch (taken) or dropped."""
        self._prompts_queued -= 1
        self._prompts_taken += taken
        if not taken and self._step_waiters:
            self._prompts_changed.notify_all()

    def _prompts_finished(self, group: list[Item]) -> None:
        """A model call holding prompts returned (their first characters are out)."""
        # Read without the lock: the common Predict batch skips it. If this group holds
        # prompts, this thread counted them (under the lock) and nobody else uncounts them.
        if not self._prompts_taken:
            return
        n = sum(it.ahead for it in group)
        if n:
            with self._lock:
                self._prompts_taken -= n
                if self._step_waiters:
                    self._prompts_changed.notify_all()

    def _chunks(self, group: list[Item]) -> list[list[Item]]:
        """Splits one length group so each chunk stays within the batch limits."""
        longest = max(len(it.ids) for it in group)
        per_call = max(1, min(self.max_batch_size, self.max_batch_chars // longest))
        return [group[i : i + per_call] for i in range(0, len(group), per_call)]

    def _executor_for(self, high: int) -> ThreadPoolExecutor:
        return self.executor if high or self._low_executor is None else self._low_executor

    # -- on the executor thread --------------------------------------------------------------
    def _work(self, batch: list[Item], high: int, loop: asyncio.AbstractEventLoop) -> None:
        """Runs batches until none may start: this one, then whatever is queued by then (a
        batch of the other lane's executor is handed over to it)."""
        mine = self._executor_for(high)
        while True:
            for group in group_by_length(batch):
                # One hand-over per call, not per text: each call_soon_threadsafe wakes the
                # event loop through its self-pipe, and the loop is the busiest thread.
                try:
                    loop.call_soon_threadsafe(_deliver, group, *self._run_batch(group))
                finally:
                    self._prompts_finished(group)
            expired: list[Item] = []
            wake = False
            with self._lock:
                self._running_high -= high
                batch = []
                if (self._may_start(self._running - 1, self._running_high)
                        and not self._wants_delay()):
                    batch, expired, high = self._take(loop.time(), self._running - 1)
                    self._running_high += high
                if not batch:
                    self._running -= 1
                    # Left queued for a delay timer, or all dropped as dead: the loop decides.
                    wake = bool(self._queues[HIGH] or self._queues[LOW])
            if expired:
                loop.call_soon_threadsafe(_expire, expired)
            if not batch:
                if wake:
                    loop.call_soon_threadsafe(self._dispatch)
                return
            target = self._executor_for(high)
            if target is not mine or (self._jobs_waiting and target is self.executor
                                      and not any(it.ahead for it in batch)):
                # The other lane's threads run it; or jobs queued meanwhile (Generate steps,
                # on the main executor) run first and this batch queues behind them, unless
                # it holds a prompt of a stream that waits for it to start (the prompts of
                # streams opened together would each wait for a step over all the others).
                try:
                    target.submit(self._work, batch, high, loop)
                    return
                except RuntimeError:  # the executor is shutting down: finish the batch here
                    pass

    def _run_batch(self, items: list[Item]) -> tuple[list[Any] | None, BaseException | None]:
        try:
            return self._compute(items), None
        except Exception as e:  # a backend failure fails these items, never the server
            log.exception("backend call failed for %d texts", len(items))
            self.stats.failed += len(items)
            return None, e

    def _compute(self, items: list[Item]) -> list[Any]:
        b = len(items)
        lengths = np.fromiter((len(it.ids) for it in items), dtype=np.int64, count=b)
        t = int(lengths.max())
        ids = np.zeros((b, t), dtype=np.int64)
        for row, it in enumerate(items):
            ids[row, : len(it.ids)] = it.ids
        state = self.backend.zero_state(b)
        for row, it in enumerate(items):
            if it.state is not None:
                state[:, row, :] = it.state
        positions = any(it.positions for it in items)
        if self.on_batch_start is not None:
            self.on_batch_start([it.enqueued_at for it in items])
        started = time.perf_counter()
        started_ns = time.time_ns() if self.tracing is not None else 0
        out = self.backend.run(ids, lengths, state, positions=positions)
        compute_s = time.perf_counter() - started
        if self.tracing is not None:
            self.tracing.model_call(items, started_ns, started_ns + int(compute_s * 1e9))
        finish = items[0].finish
        if all(it.finish is finish for it in items):  # one kind of caller: one finish call
            results = finish(out, np.arange(b), items)
        else:
            results = [None] * b
            by_finish: dict[Finish, list[int]] = {}
            for row, it in enumerate(items):
                by_finish.setdefault(it.finish, []).append(row)
            for fn, rows in by_finish.items():
                for row, res in zip(rows, fn(out, np.asarray(rows), [items[r] for r in rows]),
                                    strict=True):
                    results[row] = res
        st = self.stats
        st.compute_ns += int(compute_s * 1e9)
        st.batches += 1
        st.texts += b
        st.chars += int(lengths.sum())
        st.padded_chars += b * t
        if self.on_batch is not None:
            self.on_batch(b, b * t, compute_s)
        return results


def _own_nice() -> int:
    """This thread's nice value (0 where the OS has none to tell)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return 0


def _set_nice(value: int) -> None:
    """A worker thread's initializer: its own nice value set to `value` (Linux keeps one per
    thread; raising it needs no privilege). Elsewhere the calls run as before."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except (AttributeError, OSError) as e:  # not Linux, or not allowed: same priority
        log.warning("model threads keep their priority: %s", e)


def _start_threads(executor: ThreadPoolExecutor, n: int) -> None:
    """Starts the executor's n threads now, from this thread (ThreadPoolExecutor starts them
    on demand, from whichever thread submits): n tasks that wait for each other each take a
    thread of their own."""
    barrier = threading.Barrier(n)
    for f in [executor.submit(barrier.wait, 10.0) for _ in range(n)]:
        f.result()


def _deliver(items: list[Item], results: list[Any] | None,
             error: BaseException | None) -> None:
    """On the loop: one backend call's answers (or its error) to the callers still waiting."""
    for i, it in enumerate(items):
        if it.future.done():  # a caller that went away cancelled its future
            continue
        if error is None:
            assert results is not None
            it.future.set_result(results[i])
        else:
            it.future.set_exception(error)


def _expire(items: list[Item]) -> None:
    for it in items:
        if not it.future.done():
            it.future.set_exception(DeadlineExceeded("deadline expired while queued"))
