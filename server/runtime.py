"""The one builder of a model's serving chain: artifact -> backend -> batcher -> predictor ->
generator, used by the server, hot reload, `nextchar batch --local` and the benchmarks.

    artifact, backend = open_model(path, settings)          # blocking: files, runtime start-up
    rt = ModelRuntime.assemble("shakespeare", "3", artifact, backend, settings, metrics)
    await rt.start()                                         # warm-up, then the probe
    ...                                                      # rt.predictor / rt.generator
    await rt.close()                                         # fails queued work, frees threads

A runtime counts the calls using it (`calls`): the registry retires a replaced or unloaded
version only once that count is zero, so a long Generate stream keeps exactly its own version
alive and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .artifact import Artifact, load_artifact
from .backends import Backend, create_backend
from .batcher import Batcher, LanePolicy
from .errors import FailedPrecondition
from .generator import Generator
from .predictor import Limits, Predictor
from .settings import ServerSettings
from .stats import ModelStats

if TYPE_CHECKING:
    from .metrics import Metrics
    from .tracing import Tracing

log = logging.getLogger(__name__)

PROBE_TEXT = "To be, or not to be, that is the question:\n"


class ProbeFailed(FailedPrecondition):
    """A version's outputs are non-finite or misshapen (FAILED_PRECONDITION)."""


def open_model(path: Path, s: ServerSettings) -> tuple[Artifact, Backend]:
    """Verifies the artifact and builds its backend (blocking: file I/O, runtime start-up)."""
    artifact = load_artifact(path, backends=(s.backend,))
    backend = create_backend(artifact, s.backend, s.device, workers=s.backend_workers,
                             intra_op_threads=s.intra_op_threads, onnx_graph=s.onnx_graph)
    return artifact, backend


def build_batcher(backend: Backend, s: ServerSettings, metrics: Metrics | None = None,
                  model: str = "", stats: ModelStats | None = None,
                  tracing: Tracing | None = None) -> Batcher:
    hooks: list[tuple[Callable[[int, int, float], None], Callable[[list[float]], None]]] = []
    if metrics is not None:
        hooks.append(metrics.batch_hooks(model))
    if stats is not None:
        hooks.append((lambda texts, _padded, compute_s: stats.batch_done(texts, compute_s),
                      stats.batch_started))
    on_batch: Callable[[int, int, float], None] | None = None
    on_batch_start: Callable[[list[float]], None] | None = None
    if len(hooks) == 1:
        on_batch, on_batch_start = hooks[0]
    elif hooks:
        def on_batch(texts: int, padded: int, compute_s: float) -> None:
            for done, _ in hooks:
                done(texts, padded, compute_s)

        def on_batch_start(enqueued_at: list[float]) -> None:
            for _, started in hooks:
                started(enqueued_at)
    return Batcher(
        backend,
        batching=s.batching,
        max_batch_size=s.max_batch_size,
        max_batch_chars=s.max_batch_chars,
        max_batch_delay_ms=s.max_batch_delay_ms,
        max_queue_texts=s.max_queue_texts,
        max_queue_chars=s.max_queue_chars,
        parallel_batch_chars=s.parallel_batch_chars,
        high_timeout_s=s.high_timeout_s,
        low_lane=LanePolicy(s.low_max_queue_texts, s.low_timeout_s, s.max_queue_chars,
                            s.low_max_batch_size),
        low_lane_workers=s.low_lane_workers,
        low_lane_nice=s.low_lane_nice,
        worker_nice=s.worker_nice,
        on_batch=on_batch,
        on_batch_start=on_batch_start,
        tracing=tracing,
    )


@dataclass(eq=False)  # identity: the registry tracks runtimes in sets
class ModelRuntime:
    name: str
    version: str  # the repository folder, or the artifact's stamp for a plain artifact
    artifact: Artifact
    backend: Backend
    batcher: Batcher
    predictor: Predictor
    generator: Generator
    settings: ServerSettings
    stats: ModelStats
    probe_logits: np.ndarray | None = None  # (1, V) on PROBE_TEXT, for the next parity check
    calls: int = 0  # calls using this runtime now (leases)
    retired: bool = False  # replaced or unloaded: close once `calls` is zero
    closed: bool = field(default=False)

    @classmethod
    def assemble(cls, name: str, version: str, artifact: Artifact, backend: Backend,
                 settings: ServerSettings, metrics: Metrics | None = None,
                 stats: ModelStats | None = None,
                 tracing: Tracing | None = None) -> ModelRuntime:
        """One version's batcher, predictor and generator (not started). `stats`: this version's
        statistics (a new one when omitted)."""
        stats = stats if stats is not None else ModelStats()
        batcher = build_batcher(backend, settings, metrics, name, stats, tracing)
        predictor = Predictor(artifact, backend, batcher, Limits.from_settings(settings), name,
                              version)
        generator = Generator(predictor, step_batching=settings.step_batching,
                              flush_ms=settings.generate_flush_ms,
                              max_messages_per_s=settings.generate_max_messages_per_s,
                              prefill_wait_ms=settings.generate_prefill_wait_ms)
        return cls(name, version, artifact, backend, batcher, predictor, generator, settings,
                   stats)

    async def start(self, warmup: bool | None = None) -> None:
        """Warm-up, then the probe (every output finite and well-shaped); ProbeFailed."""
        await self.batcher.start()  # loads the model file: its errors as they are
        if self.settings.warmup if warmup is None else warmup:
            try:
                await asyncio.get_running_loop().run_in_executor(self.batcher.executor,
                                                                 self.backend.warmup)
            except Exception as e:  # the warm-up's model calls
                log.debug("model %s: warm-up failed", self.name, exc_info=e)
                raise model_failed("warm-up", self.artifact, e) from e
        await self.generator.start()
        self.probe_logits = await run_probe(self)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.generator.close()
        await self.batcher.close()
        log.info("model %s version %s closed", self.name, self.version)


def model_failed(stage: str, a: Artifact, e: Exception) -> ProbeFailed:
    """A model call that failed at start, usually graph files that do not match the manifest.
    The runtime's own first line rarely says so (TorchScript's is "The following operation
    failed ..."); its last one names the operation and the shapes."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return ProbeFailed(f"{stage}: the model failed on an input shaped as its manifest says "
                       f"(state [{a.state_layers}, B, {a.hidden_size}], {a.vocab_size} "
                       f"vocabulary ids): {type(e).__name__}: "
                       f"{lines[-1] if lines else 'no message'}")


def _probe_ids(artifact: Artifact) -> np.ndarray:
    ids = [artifact.char_to_id[c] for c in PROBE_TEXT if c in artifact.char_to_id]
    if len(ids) < 4:  # a vocabulary without English: a fixed id pattern instead
        ids = [(7 * i) % artifact.vocab_size for i in range(16)]
    return np.asarray(ids, dtype=np.int64)


async def run_probe(rt: ModelRuntime) -> np.ndarray:
    """The probe through the batcher's direct entry; returns its (1, V) logits."""
    a = rt.artifact
    ids = _probe_ids(a)
    t = len(ids)
    try:
        out = await rt.batcher.probe(ids[None, :], np.asarray([t], dtype=np.int64),
                                     rt.backend.zero_state(1), positions=True)
    except Exception as e:
        log.debug("model %s: probe failed", rt.name, exc_info=e)
        raise model_failed("probe", a, e) from e
    expected = {
        "logits": (out.logits, (1, a.vocab_size)),
        "state_out": (out.state, (a.state_layers, 1, a.hidden_size)),
        "position_logits": (out.position_logits, (1, t, a.vocab_size)),
    }
    for name, (value, shape) in expected.items():
        if value is None or tuple(value.shape) != shape:
            got = None if value is None else tuple(value.shape)
            raise ProbeFailed(f"probe: {name} has shape {got}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise ProbeFailed(f"probe: {name} has non-finite values")
    return np.asarray(out.logits, dtype=np.float32)
