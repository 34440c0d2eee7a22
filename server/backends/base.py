"""The backend protocol: load one artifact on one device, run padded batches, nothing else.

Backends never see protobuf, text or requests: int64 ids in, float32 arrays out. The batcher
calls `run` only from the backend's own executor (`make_executor`), because some runtimes
(torch) run markedly slower when called from changing threads.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..artifact import Artifact


@dataclass
class BatchOutput:
    logits: np.ndarray  # (B, V) float32, after each row's last real character
    state: np.ndarray  # (S, B, H) float32, after each row's last real character
    position_logits: np.ndarray | None  # (B, T, V) float32 when asked for


class Backend(abc.ABC):
    name: str  # the key of this backend's entry in BACKENDS (backends/__init__.py)
    device: str
    model_file: str  # the file of the artifact this instance runs (logs, model info)

    def __init__(self, artifact: Artifact, device: str) -> None:
        self.artifact = artifact
        self.device = device

    @property
    @abc.abstractmethod
    def workers(self) -> int:
        """How many `run` calls may execute at once (each on its own executor thread)."""

    def make_executor(self, initializer: Callable[[], object] | None = None) -> ThreadPoolExecutor:
        """The threads `run` is called on; `initializer` runs once on each as it starts."""
        return ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"nextchar-{self.name}",
                                  initializer=initializer)

    @abc.abstractmethod
    def run(
        self, ids: np.ndarray, lengths: np.ndarray, state: np.ndarray, positions: bool = False
    ) -> BatchOutput:
        """ids (B, T) int64 right-padded, lengths (B,) int64, state (S, B, H) float32."""

    def prepare(self) -> None:
        """Runs once on the executor thread before the first `run` (a runtime that must load
        on the thread that will call it does so here). Most runtimes need nothing."""
        return None

    def zero_state(self, batch: int) -> np.ndarray:
        a = self.artifact
        return np.zeros((a.state_layers, batch, a.hidden_size), dtype=np.float32)

    def warmup(self) -> None:
        """One small and one mixed-length batch, so the first real request pays no start-up."""
        rng = np.random.default_rng(0)
        v = self.artifact.vocab_size
        for b, t in ((1, 1), (4, 16)):
            ids = rng.integers(0, v, size=(b, t), dtype=np.int64)
            lengths = np.linspace(1, t, b).astype(np.int64)
            self.run(ids, lengths, self.zero_state(b), positions=True)



class DeviceUnavailable(Exception):
    """--device cuda where this backend finds no usable CUDA device."""
