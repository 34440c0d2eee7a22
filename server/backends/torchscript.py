"""TorchScript backend on torch (CPU or CUDA). Needs `nextchar[torch]`.

TorchScript is deprecated upstream; it stays one swappable backend. All calls, warm-up
included, run on one executor thread: measured here, torch called from a thread other than the
one it first ran on was 2.4x slower.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..artifact import Artifact
from .base import Backend, BatchOutput, DeviceUnavailable

log = logging.getLogger(__name__)


class TorchScriptBackend(Backend):
    name = "torchscript"

    model_file = "model.ts"

    def __init__(self, artifact: Artifact, device: str = "cpu", intra_op_threads: int = 0,
                 **_: object) -> None:  # workers, onnx_graph: not this runtime's
        import torch  # imported here so the ONNX server never loads it

        self.torch = torch
        has_cuda = torch.cuda.is_available()
        if device == "cuda" and not has_cuda:
            raise DeviceUnavailable("--device cuda: torch sees no CUDA device here; use --device cpu")
        resolved = "cuda" if device in ("cuda", "auto") and has_cuda else "cpu"
        super().__init__(artifact, resolved)
        self._threads = intra_op_threads or max(1, os.cpu_count() or 1)
        # Loading happens on the executor thread too; see `prepare`.
        self.module: torch.jit.ScriptModule | None = None

    @property
    def workers(self) -> int:
        return 1

    def prepare(self) -> None:
        """Loads the module; call on the executor thread before any `run`."""
        torch = self.torch
        if self.device == "cpu":
            torch.set_num_threads(self._threads)
        self.module = torch.jit.load(str(self.artifact.path / self.model_file), map_location=self.device)
        self.module.eval()
        log.info("torchscript backend on %s, %d thread(s)", self.device, self._threads)

    def run(
        self, ids: np.ndarray, lengths: np.ndarray, state: np.ndarray, positions: bool = False
    ) -> BatchOutput:
        if self.module is None:
            self.prepare()
        torch = self.torch
        dev = self.device
        with torch.inference_mode():
            logits, state_out, pos = self.module(  # type: ignore[misc]
                torch.from_numpy(ids).to(dev),
                torch.from_numpy(lengths),  # lengths stay on the CPU: packing reads them there
                torch.from_numpy(state).to(dev),
            )
            return BatchOutput(
                logits.float().cpu().numpy(),
                state_out.float().cpu().numpy(),
                pos.float().cpu().numpy() if positions else None,
            )
