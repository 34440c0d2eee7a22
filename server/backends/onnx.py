"""ONNX Runtime backend. Imports no torch, so the `[serve]` install stays small.

CPU defaults come from measurements on a 2-core machine: ORT's RNN kernel gains nothing from
intra-op threads, and its spinning thread pool burns a core while idle, so each call is
single-threaded with spinning off and parallelism comes from several concurrent calls.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..artifact import Artifact
from ..errors import ArtifactError
from .base import Backend, BatchOutput, DeviceUnavailable

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
LOOP_ONNX = "model_loop.onnx"  # the CPU-fast graph (training/onnx_loop.py), optional
STANDARD_ONNX = "model.onnx"
_TRUE, _FALSE = np.array(True), np.array(False)


def _check_declared_shapes(session: ort.InferenceSession, artifact: Artifact, path: Path) -> None:
    """The graph's fixed dimensions against the manifest: files from different exports put
    together fail here in one line naming both, not later inside ONNX Runtime."""
    a = artifact
    want = {("state", 0): (a.state_layers, "state_layers"),
            ("state", 2): (a.hidden_size, "model.hidden_size"),
            ("logits", 1): (a.vocab_size, "vocab"),
            ("state_out", 0): (a.state_layers, "state_layers"),
            ("state_out", 2): (a.hidden_size, "model.hidden_size"),
            ("position_logits", 2): (a.vocab_size, "vocab")}
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        for axis, dim in enumerate(arg.shape):
            expected = want.get((arg.name, axis))
            if expected is not None and isinstance(dim, int) and dim != expected[0]:
                raise ArtifactError(
                    f"{path}: does not match its manifest: {arg.name} has dimension {dim} at "
                    f"axis {axis} (shape {list(arg.shape)}), the manifest's {expected[1]} says "
                    f"{expected[0]}; re-export the artifact")


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu finds CUDA and cuDNN from the NVIDIA pip wheels (nvidia-cublas-cu*, ...)
    only once they are preloaded; without it the CUDA provider fails to start with a missing
    libcublasLt. Older onnxruntime versions have no preload_dlls and look on the system path."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload(directory="")
    except Exception as e:  # the libraries may come from the system instead: ORT says if not
        log.warning("onnxruntime.preload_dlls failed (%s); using the system's CUDA libraries", e)


class OnnxBackend(Backend):
    name = "onnx"

    def __init__(
        self,
        artifact: Artifact,
        device: str = "cpu",
        workers: int = 0,
        intra_op_threads: int = 0,
        onnx_graph: str = "auto",
    ) -> None:
        graph = onnx_graph
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or 1
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        want_cuda = device in ("cuda", "auto") and CUDA_EP in ort.get_available_providers()
        if want_cuda:
            _preload_cuda_libraries()
        if device == "cuda" and not want_cuda:
            raise DeviceUnavailable(
                "--device cuda: onnxruntime has no CUDAExecutionProvider here "
                f"(providers: {', '.join(ort.get_available_providers())}); install "
                "onnxruntime-gpu on a CUDA machine or use --device cpu"
            )
        providers = [CUDA_EP, "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        self.graph = self._choose_graph(artifact, graph, want_cuda)
        path = artifact.path / (LOOP_ONNX if self.graph == "loop" else STANDARD_ONNX)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT's own classes (InvalidProtobuf, Fail, ...): a bad file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it: {reason}") from e
        _check_declared_shapes(self.session, artifact, path)
        # ORT silently falls back to CPU when the CUDA provider cannot start; report the truth.
        on_cuda = self.session.get_providers()[0] == CUDA_EP
        if device == "cuda" and not on_cuda:
            raise DeviceUnavailable("--device cuda: the CUDA provider failed to start (no GPU?)")
        super().__init__(artifact, "cuda" if on_cuda else "cpu")
        # One stream of work keeps a GPU busy; on CPU, one call per core.
        self._workers = workers or (1 if on_cuda else max(1, os.cpu_count() or 1))
        # The Loop graph of this version skips its position-logits GEMM when told to
        # (training/onnx_loop.py); older artifacts' graphs compute it always.
        self._positions_switch = "positions" in {i.name for i in self.session.get_inputs()}
        self.model_file = path.name
        log.info("onnx backend (%s graph, %s) on %s, %d worker(s), intra-op %d", self.graph,
                 path.name, self.device, self._workers, opts.intra_op_num_threads)

    @staticmethod
    def _choose_graph(artifact: Artifact, graph: str, cuda: bool) -> str:
        """auto: the loop graph on CPU (2-3.5x ORT's RNN kernel, docs/benchmarks.md), the standard one on CUDA."""
        if graph == "loop" and not artifact.has_file(LOOP_ONNX):
            raise ArtifactError(f"--onnx-graph loop: {artifact.path} has no {LOOP_ONNX} "
                                "(re-export it with this version of nextchar)")
        if graph == "auto":
            return "loop" if artifact.has_file(LOOP_ONNX) and not cuda else "standard"
        return graph

    @property
    def workers(self) -> int:
        return self._workers

    def run(
        self, ids: np.ndarray, lengths: np.ndarray, state: np.ndarray, positions: bool = False
    ) -> BatchOutput:
        names = ["logits", "state_out", "position_logits"] if positions else ["logits", "state_out"]
        feeds = {"ids": ids, "lengths": lengths, "state": state}
        if self._positions_switch:
            feeds["positions"] = _TRUE if positions else _FALSE
        out = self.session.run(names, feeds)
        return BatchOutput(out[0], out[1], out[2] if positions else None)
