"""The benchmark model as the peers run it: a nextchar artifact's ONNX graph on ONNX Runtime,
with numpy and onnxruntime only (no nextchar import), shared by the MLServer runtime
(bench/mlserver_runtime/runtime.py) and the Triton peer (bench/pytriton_server.py).

    model = PeerModel("runs/peer_bench/artifact", graph="loop")   # or "standard"
    probs = model.probs(["To be, or not to b"])                     # (N, V) float32
    top_ids, top_probs = model.top(probs, k=5)                      # (N, k), ranked as nextchar

graph "loop" is `model_loop.onnx`, the graph nextchar serves on CPU (embedding folded into
layer 0, a Scan over time), fed `positions=False` so it skips the position-logits GEMM as
nextchar does; "standard" is `model.onnx` (ONNX Runtime's own RNN kernel), what a user of
these servers gets from a plain torch.onnx export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

GRAPH_FILES = {"loop": "model_loop.onnx", "standard": "model.onnx"}
_FALSE = np.array(False)


class BadText(ValueError):
    """A text the model cannot encode (empty, or a character outside the vocabulary)."""


class PeerModel:
    def __init__(self, artifact: str | Path, graph: str = "loop", intra_op_threads: int = 1) -> None:
        artifact = Path(artifact)
        manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
        self.name: str = manifest["name"]
        self.version: str = manifest["version"]
        self.vocab: list[str] = manifest["vocab"]
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.vocab_bytes = np.array([c.encode("utf-8") for c in self.vocab], dtype=object)
        self.state_shape = (int(manifest["state_layers"]), int(manifest["model"]["hidden_size"]))
        self.graph = graph
        opts = ort.SessionOptions()
        # What nextchar measured best on 2 cores (server/backends/onnx.py): one intra-op thread
        # per session, no spinning (a spinning ORT pool burns a core while idle).
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(artifact / GRAPH_FILES[graph]), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self._positions_switch = "positions" in {i.name for i in self.session.get_inputs()}
        self.probs(["warm", "up"])

    def probs(self, texts: list[str]) -> np.ndarray:
        """texts -> next-character probabilities (N, V) float32."""
        n = len(texts)
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
        if n == 0 or lengths.min() < 1:
            raise BadText("every text needs at least one character")
        ids = np.zeros((n, int(lengths.max())), dtype=np.int64)  # (B, T)
        for row, text in enumerate(texts):
            try:
                ids[row, : len(text)] = [self.index[c] for c in text]
            except KeyError as e:
                raise BadText(f"text[{row}]: character {e} is not in the vocabulary") from e
        state = np.zeros((self.state_shape[0], n, self.state_shape[1]), dtype=np.float32)
        feeds = {"ids": ids, "lengths": lengths, "state": state}
        if self._positions_switch:
            feeds["positions"] = _FALSE
        (logits,) = self.session.run(["logits"], feeds)  # (B, V)
        z = logits - logits.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z.astype(np.float32, copy=False)

    @staticmethod
    def top(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, k) ids and probabilities, highest first, ties to the lower id (as nextchar)."""
        k = min(k, probs.shape[1])
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return ids, np.take_along_axis(probs, ids, axis=1)
