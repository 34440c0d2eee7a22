"""Per-version inference statistics, cumulative since the version was loaded: what KServe's
and Triton's ModelStatistics report (counts and nanoseconds, as Triton counts them).

Request outcomes are recorded on the event loop; batch figures on the worker threads, under a
lock (once per model call, not per text).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, n: int = 1) -> None:
        self.count += n
        self.ns += ns


@dataclass
class ModelStats:
    success: Duration = field(default_factory=Duration)  # requests, whole call
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # per text: queue wait
    compute_infer: Duration = field(default_factory=Duration)  # per text share of model calls
    inference_count: int = 0  # texts answered
    execution_count: int = 0  # model calls
    last_inference_ms: int = 0  # wall clock, ms since the epoch (Triton's field)
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> model calls
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_done(self, ok: bool, texts: int, started_ns: int) -> None:
        """On the event loop, once per request."""
        elapsed = time.perf_counter_ns() - started_ns
        if ok:
            self.success.add(elapsed)
            self.inference_count += texts
            self.last_inference_ms = time.time_ns() // 1_000_000
        else:
            self.fail.add(elapsed)

    def batch_started(self, enqueued_at: Sequence[float]) -> None:
        """On a worker thread: each text's time.monotonic() enqueue time."""
        now = time.monotonic()
        waited = sum(max(0.0, now - t) for t in enqueued_at)
        with self._lock:
            self.queue.add(int(waited * 1e9), len(enqueued_at))

    def batch_done(self, texts: int, compute_s: float) -> None:
        ns = int(compute_s * 1e9)
        with self._lock:
            self.execution_count += 1
            self.compute_infer.add(ns * texts, texts)
            self.batches.setdefault(texts, Duration()).add(ns)
