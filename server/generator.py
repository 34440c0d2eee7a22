"""Streaming generation with step-level batching: all active Generate streams advance together.

    generator = Generator(predictor, step_batching=True)
    stream = generator.open(GenerateParams(prompt="To be", max_chars=200, seed=7), deadline)
    try:
        async for chunk in stream.chunks():   # Chunk(text, stop_reason, state)
            ...
    finally:
        stream.close()                        # idempotent: frees the slot at once
    await generator.close()

A stream's life:
  1. `open`: validation and admission. At most `Limits.max_streams` streams are open at once
     (more -> Overloaded, RESOURCE_EXHAUSTED); a call whose deadline already passed is refused.
  2. Prefill: the prompt (with its start state, if any) goes through the batcher like a Predict
     text, so it shares the batcher's queue bound and deadline handling, and prompts of any
     length are ingested exactly (padded batches use `lengths`). Right after that model call,
     on its worker thread, the stream's first character is sampled and posted: the first text
     waits for no step.
  3. Steps: one step samples one character for every stream of its lane from that stream's
     logits (one vectorised call per group of equal settings, one uniform draw per stream from
     the stream's own numpy Generator), then makes ONE backend call (B = streams, T = 1) that
     returns every stream's next logits and state. Steps run on the backend's executor thread
     (never on the event loop); each step queues the next at the back of the executor's queue,
     so Predict batches queued meanwhile run in between, and the model never waits for the
     event loop to finish sending. Streams join (prefill done) and leave (finished, cancelled,
     expired) between steps. While at least as many new streams' prompts are queued or in a
     model call as the step would advance streams (a burst of new streams), the step first
     waits for them, up to `prefill_wait_ms`: on a machine with fewer cores than busy threads
     a step beside them takes the core that admitting and prefilling the burst needs, and
     its streams' first characters wait. A few new streams beside many running ones do not
     hold the steps up.
  4. Each step posts its new text to the event loop; the consumer (the servicer) sends it as a
     message at most every `flush_ms` per stream: the first text and the end go at once, text
     produced meanwhile rides in the next message. A gRPC message costs the event loop far more
     than a step costs per stream (docs/streaming.md), so under load this is what keeps the
     loop from capping throughput; with one stream it is 50 messages a second at most. With
     many streams open the interval stretches so that all of them together send at most
     `max_messages_per_s` (`flush_interval`).
     Characters that might begin a stop string are held back until they cannot.

With `step_batching` (the default) all streams share one lane; off, every stream has its own
lane (one B=1 call per stream per step): the baseline the streaming benchmark compares against.

Threads: the fields a step uses (rng, logits, state, text so far) belong to the executor thread
once a stream has joined; the consumer side (outbox, event, error) belongs to the event loop;
`closed` is written by the loop and read by steps. Deadlines use time.monotonic(), the clock of
asyncio's loop.time().
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

# The client checks stop strings against the same bounds before it calls: one definition.
from ..client.limits import MAX_STOP_CHARS, MAX_STOP_STRINGS
from .backends.base import BatchOutput
from .batcher import HIGH, Item
from .errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded
from .predictor import Predictor

log = logging.getLogger(__name__)

STOP_MAX_CHARS = "max_chars"
STOP_STRING = "stop_string"


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    max_chars: int
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: all characters
    top_p: float = 0.0  # 0 or 1: all characters
    seed: int | None = None  # None: a random seed
    stop: tuple[str, ...] = ()
    state: bytes = b""  # encoded start state; b"": fresh
    return_state: bool = False
    lane: int = HIGH  # the prefill's batcher lane


@dataclass
class Chunk:
    text: str
    stop_reason: str | None = None  # set on the last chunk: STOP_MAX_CHARS | STOP_STRING
    state: np.ndarray | None = None  # last chunk with return_state: (S, H) after all text


@dataclass
class GenerateStats:
    """Counters the tests, benchmarks and metrics read."""

    opened: int = 0
    finished: int = 0  # ran to max_chars or a stop string
    closed_early: int = 0  # cancelled, disconnected, expired or failed before finishing
    rejected: int = 0  # refused at admission: max_streams reached
    steps: int = 0  # backend calls made by steps
    step_rows: int = 0  # sum of B over those calls
    chars: int = 0  # characters sampled


@dataclass
class _Update:
    """What one step produced for one stream, posted to the event loop."""

    stream: GenerationStream
    text: str = ""
    stop_reason: str | None = None
    state: np.ndarray | None = None
    error: BaseException | None = None


@dataclass
class _Lane:
    """Streams advanced by one chain of steps. Guarded by Generator._lock except `active`,
    which only the step running now touches."""

    active: list[GenerationStream] = field(default_factory=list)
    joining: list[GenerationStream] = field(default_factory=list)
    driving: bool = False  # a step of this lane is queued or running


def finish_prefill(out: BatchOutput, rows: np.ndarray, items: Sequence[Item]) -> list[None]:
    """On the worker thread, right after the prompts' model call: each stream takes its logits
    and state, its first character is sampled and sent, and it joins its lane here. So the
    first text waits for no step (with many streams open, a step is a model call over all of
    them, queued behind the other prompts), and the first step needs no trip through the event
    loop (busy sending the streams' text)."""
    streams: list[GenerationStream] = [it.params for it in items]
    for r, stream in zip(rows.tolist(), streams, strict=True):
        stream.prefilled(out.logits[r].astype(np.float32, copy=True), out.state[:, r, :].copy())
    # One batcher serves one model, and so one generator: its prompts share this call.
    streams[0]._gen._first_characters(streams)
    return [None] * len(items)


# Temperatures for which float32 logits / t in float64 neither overflow nor underflow, so the
# quotients keep the logits' order and ties exactly.
ORDER_BY_LOGITS = (1e-30, 1e30)
# Below it, float64 logits / t may overflow to +-inf: sample_ids divides each row's distance
# from its maximum instead. The front ends pass float32 temperatures (as_float32), which cannot
# overflow float32 logits this way; a caller of sample_ids with a float64 t below ~1e-270 could.
COLD = 1e-30
FLOAT32_MAX = float(np.finfo(np.float32).max)


def as_float32(value: float, name: str) -> float:
    """`value` as nextchar.v1's float fields carry it. Front ends that read a double (HTTP's
    JSON) pass their temperature and top_p through this, so the same request samples the same
    text over every protocol: a top_p of 1e-50 is 0 (off) over gRPC, and 0.7 is 0.699999988
    there. A finite number past float32's range is refused, naming it (gRPC makes it inf)."""
    with np.errstate(over="ignore"):
        rounded = float(np.float32(value))
    if math.isinf(rounded) and math.isfinite(value):
        raise InvalidInput(f"{name} {value:g} is beyond float32's range (<= {FLOAT32_MAX:.4g})")
    return rounded


# For callers that can continue from a state (nextchar.v1, native JSON); front ends without
# states (OpenAI) leave it out.
STATE_HINT = " (with a state: the characters that follow the text it was taken after)"


def descending_order(logits: np.ndarray) -> np.ndarray:
    """Row-wise ids (B, V) of float32 logits, largest first, ties lower id first: exactly
    np.argsort(-(logits / t), axis=1, kind="stable") in float64 for a temperature t within
    ORDER_BY_LOGITS (the division keeps the order and the ties of float32 values), from one
    plain sort of unique int64 keys (the float's bits made order-preserving, then the id): about
    half the time of the stable argsort, which is most of a step's sampling. Logits are finite
    or infinite, never NaN (the load probe refuses a model whose outputs are not finite).
    """
    v = logits.shape[1]
    id_bits = max(1, (v - 1).bit_length())
    neg = -(logits + np.float32(0.0))  # -0.0 and 0.0: one key
    bits = neg.view(np.int32).astype(np.int64)
    keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) << id_bits) | np.arange(v, dtype=np.int64)
    keys.sort(axis=1)
    return keys & ((1 << id_bits) - 1)


def sample_ids(
    logits: np.ndarray, uniforms: np.ndarray, temperature: float, top_k: int, top_p: float
) -> np.ndarray:
    """Character ids (B,) from logits (B, V) and one uniform draw in [0, 1) per row.

    Temperature, then top-k, then top-p, then the draw mapped through the cumulative
    probabilities of the candidates sorted by logit (ties: lower id first). Every operation is
    row-wise, so a row's answer does not depend on the other rows (streams) in the batch.
    temperature 0 is greedy (argmax; the draw is not used).
    """
    if temperature == 0.0:
        return np.argmax(logits, axis=1)
    z = logits.astype(np.float64)  # (B, V)
    if temperature < COLD:
        # So cold that logits / t could overflow to +-inf (then inf - inf is nan, and the draw
        # picks garbage): divide each row's distance from its maximum instead, which is <= 0,
        # so the maximum stays 0 and the rest go to -inf, probability 0: greedy, as t -> 0 is.
        z -= z.max(axis=1, keepdims=True)
    with np.errstate(over="ignore"):  # only below COLD, where the -inf are meant
        z /= temperature
    if logits.dtype == np.float32 and ORDER_BY_LOGITS[0] <= temperature <= ORDER_BY_LOGITS[1]:
        order = descending_order(logits)  # (B, V)
    else:  # float64 logits, or z may overflow or underflow: ties the logits do not have
        order = np.argsort(-z, axis=1, kind="stable")
    if 0 < top_k < order.shape[1]:
        order = order[:, :top_k]  # (B, k)
    zs = np.take_along_axis(z, order, axis=1)
    cum = np.cumsum(np.exp(zs - zs[:, :1]), axis=1)
    cum /= cum[:, -1:]
    rows = np.arange(len(order))
    last = np.full(len(order), order.shape[1] - 1)
    if 0.0 < top_p < 1.0:
        # The smallest prefix of candidates whose probability reaches top_p.
        last = np.minimum((cum < top_p).sum(axis=1), last)
    target = uniforms * cum[rows, last]
    pick = np.minimum((cum <= target[:, None]).sum(axis=1), last)
    return order[rows, pick]


def sample_id(
    logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float
) -> int:
    """One id from (V,) logits with `rng`: `sample_ids` for a single stream."""
    u = np.array([0.0 if temperature == 0.0 else rng.random()])
    return int(sample_ids(logits[None, :], u, temperature, top_k, top_p)[0])


class GenerationStream:
    """One Generate call: its settings, its model state, its text."""

    def __init__(self, generator: Generator, params: GenerateParams, prompt_ids: np.ndarray,
                 start_state: np.ndarray | None, deadline: float | None) -> None:
        self._gen = generator
        self.params = params
        self.prompt_ids = prompt_ids  # (T,) int64
        self.start_state = start_state  # (S, H) or None
        self.deadline = deadline  # time.monotonic() seconds, or None
        # Step side (executor thread once joined). The numpy Generator is made at the first
        # draw, on the worker: seeding one costs ~15 us, a noticeable share of what the event
        # loop spends opening a stream, and greedy streams never draw.
        self._rng: np.random.Generator | None = None
        self.logits: np.ndarray | None = None  # (V,) after prompt + generated[:fed]
        self.state: np.ndarray | None = None  # (S, H) after prompt + generated[:fed]
        self.generated: list[str] = []
        self.last_id = 0
        self.sampled = False  # last_id was sampled but not yet read by the model (steps feed it)
        self.visible = 0  # generated[:visible] may be shown to the client
        self.sent = 0  # generated[:sent] has been posted to the loop
        self.ended: str | None = None  # stop reason, as the steps see it
        self.end_state: np.ndarray | None = None
        self._max_stop = max((len(s) for s in params.stop), default=0)
        # States after the last few characters, so a stop string can be taken back out of the
        # returned state too: history[-k] is the state before the k-th last sampled character.
        self._history: deque[np.ndarray] | None = (
            deque(maxlen=self._max_stop) if params.return_state and params.stop else None
        )
        # Consumer side (event loop).
        self.stop_reason: str | None = None
        self.final_state: np.ndarray | None = None
        self.error: BaseException | None = None
        self.closed = False
        self._outbox: list[str] = []
        self._event = asyncio.Event()
        self._hold_until = 0.0  # loop.time() before which new text waits (generate_flush_ms)
        self._timer: asyncio.TimerHandle | None = None

    # -- consumer side (event loop) ----------------------------------------------------------
    async def chunks(self) -> AsyncIterator[Chunk]:
        """The text as it is produced; the last chunk carries the stop reason (and state)."""
        await self._prefill()  # the stream has joined its lane (finish_prefill)
        loop = asyncio.get_running_loop()
        while True:
            await self._event.wait()
            self._event.clear()
            if self.error is not None:
                if self._outbox:  # what was made visible before the error still goes out
                    text = "".join(self._outbox)
                    self._outbox.clear()
                    yield Chunk(text)
                raise self.error
            if self.closed:
                return
            if self.stop_reason is not None:
                text = "".join(self._outbox)
                self._outbox.clear()
                yield Chunk(text, self.stop_reason, self.final_state)
                return
            if not self._outbox:
                continue  # the flush timer found nothing new
            text = "".join(self._outbox)
            self._outbox.clear()
            interval = self._gen.flush_interval()
            if interval > 0:
                # Text of the next steps waits for the timer (or the end) to ride along.
                self._hold_until = loop.time() + interval
                self._timer = loop.call_at(self._hold_until, self._event.set)
            yield Chunk(text)

    async def _prefill(self) -> None:
        loop = asyncio.get_running_loop()
        item = Item(ids=self.prompt_ids, future=loop.create_future(), finish=finish_prefill,
                    params=self, deadline=self.deadline, state=self.start_state,
                    lane=self.params.lane, ahead=True)
        await self._gen.batcher.submit([item])

    def prefilled(self, logits: np.ndarray, state: np.ndarray) -> None:
        """Worker thread: the model read the prompt."""
        self.logits, self.state = logits, state
        if self._history is not None:
            self._history.append(state)

    def close(self) -> None:
        """Idempotent. Frees the slot at once; the next step drops the stream."""
        if self.closed:
            return
        self.closed = True
        self._gen._release(self)
        if self._timer is not None:
            self._timer.cancel()
        self._event.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._event.set()

    def deliver(self, update: _Update, now: float) -> None:
        """Takes a step's update (event loop); wakes the consumer unless its text must wait."""
        if self.closed:
            return
        if update.error is not None:
            if update.text:
                self._outbox.append(update.text)
            self.fail(update.error)
            return
        if update.text:
            self._outbox.append(update.text)
        if update.stop_reason is not None:
            self.stop_reason, self.final_state = update.stop_reason, update.state
            self._event.set()
        elif now >= self._hold_until:
            self._event.set()

    # -- step side (executor thread) ---------------------------------------------------------
    @property
    def sampling(self) -> tuple[float, int, float]:
        """Streams with equal sampling settings are sampled in one vectorised call."""
        p = self.params
        return p.temperature, p.top_k, p.top_p

    def draw(self) -> float:
        """This stream's next uniform draw (none for greedy streams)."""
        if self.params.temperature == 0.0:
            return 0.0
        if self._rng is None:
            self._rng = np.random.default_rng(self.params.seed)
        return float(self._rng.random())

    def advance(self, cid: int) -> bool:
        """Takes the sampled character id. Returns whether the model must now read it."""
        p = self.params
        self.last_id = cid
        self.generated.append(self._gen.vocab[cid])
        n = len(self.generated)
        stop = self._matched_stop()
        if stop is not None:
            self.ended = STOP_STRING
            self.visible = n - len(stop)
            if self._history is not None:
                self.end_state = self._history[-len(stop)]
            return False
        if n >= p.max_chars:
            self.ended = STOP_MAX_CHARS
            self.visible = n
            return p.return_state  # one more model call gives the state after the last char
        self.visible = n - self._held_back()
        return True

    def fed(self, logits: np.ndarray, state: np.ndarray) -> None:
        """The model read `last_id`: logits (V,) and state (S, H) after it."""
        self.logits, self.state = logits, state
        if self._history is not None:
            self._history.append(state)
        if self.ended == STOP_MAX_CHARS:
            self.end_state = state

    def update(self) -> _Update:
        """The text made visible since the last update (and the end, if reached)."""
        return _Update(self, self._unsent(), self.ended, self.end_state)

    def failed(self, error: BaseException) -> _Update:
        """The text made visible and not yet posted, then the error: the client gets every
        character it was told about."""
        return _Update(self, self._unsent(), error=error)

    def _unsent(self) -> str:
        text = "".join(self.generated[self.sent : self.visible])
        self.sent = self.visible
        return text

    def _tail(self, n: int) -> str:
        return "".join(self.generated[-n:])

    def _matched_stop(self) -> str | None:
        if not self._max_stop:
            return None
        tail = self._tail(self._max_stop)
        # Of the stops ending here, the longest starts first.
        hits = [s for s in self.params.stop if tail.endswith(s)]
        return max(hits, key=len) if hits else None

    def _held_back(self) -> int:
        """How many trailing characters could still be the start of a stop string."""
        if self._max_stop <= 1:
            return 0
        tail = self._tail(self._max_stop - 1)
        held = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, len(tail)), held, -1):
                if tail.endswith(s[:k]):
                    held = k
                    break
        return held


class Generator:
    def __init__(self, predictor: Predictor, step_batching: bool = True,
                 flush_ms: float = 20.0, max_messages_per_s: float = 1000.0,
                 prefill_wait_ms: float = 50.0) -> None:
        # Defaults as ServerSettings' generate_flush_ms, generate_max_messages_per_s and
        # generate_prefill_wait_ms.
        self.predictor = predictor
        self.artifact = predictor.artifact
        self.batcher = predictor.batcher
        self.vocab = predictor.artifact.vocab
        self.max_streams = predictor.limits.max_streams
        self.step_batching = step_batching
        self.flush_s = flush_ms / 1000.0
        self.max_messages_per_s = max_messages_per_s
        self.prefill_wait_s = prefill_wait_ms / 1000.0
        self.stats = GenerateStats()
        self._open: set[GenerationStream] = set()
        self._stepping: set[GenerationStream] = set()  # joined a lane, not yet dropped
        self._lane = _Lane()  # the shared lane (step batching on)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def flush_interval(self) -> float:
        """Seconds a stream's new text waits after a message: flush_ms, stretched so that the
        open streams together send at most about max_messages_per_s messages. A message costs
        the event loop far more than a step costs a stream: 64 streams at one message per
        20 ms ask more of the loop than 2 cores give it, and then the loop, not the model, sets
        the pace of every stream and of the calls waiting to be accepted (docs/streaming.md)."""
        if self.max_messages_per_s <= 0:
            return self.flush_s
        return max(self.flush_s, len(self._open) / self.max_messages_per_s)

    @property
    def active_streams(self) -> int:
        """Generate calls holding a slot: admitted and not yet closed."""
        return len(self._open)

    @property
    def stepping_streams(self) -> int:
        """Streams that steps still advance (a cancelled one leaves at the next step)."""
        return len(self._stepping)

    async def start(self) -> None:
        """Nothing to start ahead: the first stream starts the steps. Kept for symmetry."""
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Fails the open streams with UNAVAILABLE; steps stop at their next turn."""
        self._closed = True
        for s in list(self._open):
            s.fail(NotReady("server is shutting down; retry on another replica"))

    # -- admission (event loop) --------------------------------------------------------------
    def open(self, params: GenerateParams, deadline: float | None = None) -> GenerationStream:
        """Validates and admits one stream; the caller must close() it. deadline: loop.time()."""
        if self._closed:
            raise NotReady("server is shutting down")
        ids, start = self.check(params)
        self._loop = asyncio.get_running_loop()
        if deadline is not None and self._loop.time() >= deadline:
            raise DeadlineExceeded("deadline expired before generation started")
        if len(self._open) >= self.max_streams:
            self.stats.rejected += 1
            raise Overloaded(f"server busy: {len(self._open)} Generate streams active, limit "
                             f"max_streams {self.max_streams}; retry with backoff")
        stream = GenerationStream(self, params, ids, start, deadline)
        self._open.add(stream)
        self.stats.opened += 1
        return stream

    def check(self, params: GenerateParams) -> tuple[np.ndarray, np.ndarray | None]:
        """What open() refuses about the call itself, admitting nothing: the prompt's ids and
        the start state (None: fresh). Front ends that read doubles pass temperature and top_p
        through as_float32 first: what nextchar.v1 carries, so every front end samples alike."""
        self._validate(params)
        try:
            ids = self.artifact.encode(params.prompt)
        except InvalidInput as e:
            raise InvalidInput(e.message.replace("texts[0]", "prompt", 1)) from None
        start = self.predictor.state_codec.decode(params.state, "state") if params.state else None
        return ids, start

    def _validate(self, p: GenerateParams) -> None:
        lim = self.predictor.limits
        v = self.artifact.vocab_size
        if not p.prompt:
            raise InvalidInput("prompt is empty: send at least one character" + STATE_HINT)
        if len(p.prompt) > lim.max_chars_per_text:
            raise InvalidInput(f"prompt has {len(p.prompt)} characters > max_chars_per_text "
                               f"{lim.max_chars_per_text}")
        if not 1 <= p.max_chars <= lim.max_chars_per_text:
            raise InvalidInput(f"max_chars must be between 1 and {lim.max_chars_per_text} "
                               f"(max_chars_per_text), got {p.max_chars}")
        if not (math.isfinite(p.temperature) and p.temperature >= 0):
            raise InvalidInput(f"temperature must be a finite number >= 0 (0: greedy) within "
                               f"float32's range (<= {FLOAT32_MAX:.4g}), got {p.temperature}")
        if not 0 <= p.top_k <= v:
            raise InvalidInput(f"top_k must be between 0 (all) and the vocabulary size {v}, "
                               f"got {p.top_k}")
        if not (math.isfinite(p.top_p) and 0 <= p.top_p <= 1):
            raise InvalidInput(f"top_p must be between 0 and 1 (0 or 1: off), got {p.top_p}")
        if len(p.stop) > MAX_STOP_STRINGS:
            raise InvalidInput(f"{len(p.stop)} stop strings > {MAX_STOP_STRINGS}")
        for i, s in enumerate(p.stop):
            if not 1 <= len(s) <= MAX_STOP_CHARS:
                raise InvalidInput(f"stop[{i}] has {len(s)} characters; each stop string needs "
                                   f"1 to {MAX_STOP_CHARS}")

    def _release(self, stream: GenerationStream) -> None:
        if stream in self._open:
            self._open.discard(stream)
            if stream.stop_reason is not None and stream.error is None:
                self.stats.finished += 1
            else:
                self.stats.closed_early += 1

    def _first_characters(self, streams: list[GenerationStream]) -> None:
        """Worker thread, after the prompts' model call: samples each stream's first character,
        posts it, and lets the streams that go on join their lane (the step feeds the character
        to the model). Posting before joining keeps each stream's text in order: the loop runs
        posts in the order they were made."""
        streams = [s for s in streams if not s.closed]
        if self._closed or not streams:
            return
        feed = self._sample(streams)
        fed = set(feed)
        updates: list[_Update] = []
        for s in streams:
            if s not in fed:  # ended at its first character (max_chars 1, a stop string)
                updates.append(s.update())
            elif s.ended is None and (u := s.update()).text:
                updates.append(u)
            # else: it ended with return_state: the end goes out once the feed gives the state
        if updates:
            self._post(updates)
        for s in feed:
            s.sampled = True
            self._join(s)

    def _join(self, stream: GenerationStream) -> None:
        """A prefilled stream enters its lane; the lane's next step takes it. Called on the
        worker thread that ran the prefill (everything it touches is under the lock or set
        once: `closed` may turn True meanwhile, which the next step sees)."""
        if stream.closed or self._closed:
            return
        lane = self._lane if self.step_batching else _Lane()
        with self._lock:
            self._stepping.add(stream)
            lane.joining.append(stream)
            start = not lane.driving
            lane.driving = True
        if start:
            self._queue_step(lane)

    # -- steps -------------------------------------------------------------------------------
    def _queue_step(self, lane: _Lane) -> None:
        """Queues the lane's next step at the back of the backend's executor queue."""
        try:
            self.batcher.submit_steps(self._drive, lane)
        except RuntimeError:  # the executor is shut down: the server is stopping
            self._stop_lane(lane, NotReady("server is shutting down; retry on another replica"))

    def _stop_lane(self, lane: _Lane, error: BaseException) -> None:
        """Drops every stream of the lane; each one's call fails with `error`."""
        with self._lock:
            streams = [*lane.active, *lane.joining]
            self._stepping.difference_update(streams)
            lane.active, lane.joining, lane.driving = [], [], False
        self._post([s.failed(error) for s in streams])

    def _drive(self, lane: _Lane) -> None:
        """One step of one lane (executor thread), then the lane's next step is queued."""
        try:
            # New streams' prompts first while they outnumber the streams this step would
            # advance (a burst of new streams); those that finish meanwhile join this step.
            # A steady arrival of a few new streams beside many running ones does not wait.
            with self._lock:
                stepping = len(lane.active) + len(lane.joining)
            self.batcher.wait_for_prompts(self.prefill_wait_s, stepping)
            with self._lock:
                lane.active.extend(lane.joining)
                lane.joining.clear()
                batch = lane.active
            if self._closed:
                self._stop_lane(lane, NotReady("server is shutting down; retry on another replica"))
                return
            updates, remaining = self._step(batch)
            if updates:
                self._post(updates)
            with self._lock:
                keep = set(remaining)
                self._stepping.difference_update([s for s in batch if s not in keep])
                lane.active = remaining
                more = lane.driving = bool(lane.active or lane.joining)
        except Exception as e:  # never let a lane die silently with streams waiting on it
            log.exception("generation lane failed")
            self._stop_lane(lane, e)
            return
        if more:
            self._queue_step(lane)

    def _post(self, updates: list[_Update]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(_deliver_all, updates)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _step(self, batch: list[GenerationStream]) -> tuple[list[_Update], list[GenerationStream]]:
        """Samples one character for every live stream and feeds them to the model in one call.

        Returns the updates to post and the streams that continue.
        """
        now = time.monotonic()
        updates: list[_Update] = []
        live: list[GenerationStream] = []
        feed: list[GenerationStream] = []  # characters sampled, for the model to read
        fresh: list[GenerationStream] = []  # to sample now
        for s in batch:
            if s.closed:
                continue
            if s.deadline is not None and now >= s.deadline:
                updates.append(s.failed(DeadlineExceeded(
                    f"deadline expired after {s.visible} characters")))
                continue
            live.append(s)
            if s.sampled:  # its first character, sampled after its prefill
                s.sampled = False
                feed.append(s)
            else:
                fresh.append(s)
        feed += self._sample(fresh)
        per_call = self.batcher.max_batch_size
        try:
            for i in range(0, len(feed), per_call):
                part = feed[i : i + per_call]
                b = len(part)
                ids_in = np.fromiter((s.last_id for s in part), dtype=np.int64, count=b)
                state = np.stack([s.state for s in part], axis=1)  # type: ignore[misc]  # (S, B, H)
                out = self.batcher.run_model(ids_in.reshape(b, 1), np.ones(b, dtype=np.int64),
                                             state)
                for row, s in enumerate(part):
                    s.fed(out.logits[row], out.state[:, row, :])
                self.stats.steps += 1
                self.stats.step_rows += b
        except Exception as e:  # a backend failure fails these streams, never the server
            log.error("generation step failed for %d streams", len(feed), exc_info=e)
            return updates + [s.failed(e) for s in live], []
        for s in live:
            u = s.update()
            if u.text or u.stop_reason is not None:
                updates.append(u)
        return updates, [s for s in live if s.ended is None]

    def _sample(self, streams: list[GenerationStream]) -> list[GenerationStream]:
        """One character for each stream from its logits (one vectorised call per group of
        equal settings); returns the streams the model must now read it for."""
        groups: dict[tuple[float, int, float], list[GenerationStream]] = {}
        for s in streams:
            groups.setdefault(s.sampling, []).append(s)
        feed: list[GenerationStream] = []
        for (temperature, top_k, top_p), group in groups.items():
            logits = np.stack([s.logits for s in group])  # type: ignore[misc]  # (B, V)
            uniforms = np.fromiter((s.draw() for s in group), dtype=np.float64, count=len(group))
            ids = sample_ids(logits, uniforms, temperature, top_k, top_p)
            feed += [s for s, cid in zip(group, ids.tolist(), strict=True) if s.advance(cid)]
        self.stats.chars += len(streams)
        return feed


def _deliver_all(updates: list[_Update]) -> None:
    now = asyncio.get_running_loop().time()
    for u in updates:
        u.stream.deliver(u, now)
