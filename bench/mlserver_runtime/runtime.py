"""A Seldon MLServer custom runtime serving a nextchar artifact's model.onnx on ONNX Runtime.

The peer in the benchmark of docs/benchmarks.md ("Peer benchmark: MLServer"). It answers the
same V2 tensors as nextchar's own KServe endpoint (docs/kserve.md), so one load generator sends
byte-identical requests to both:

    input   text BYTES [N]
    params  top_k (int64_param; absent = 5, nextchar's default)
    outputs probs FP32 [N, V], top_ids INT64 [N, k], top_chars BYTES [N, k], top_probs FP32 [N, k]

It runs in MLServer's own venv (.venv-mlserver: mlserver 1.7.1, onnxruntime, numpy) and never
imports nextchar: it reads manifest.json (vocab, state shape) itself. MLServer's adaptive
batching merges concurrent requests into one `predict` call along the first axis.

    .venv-mlserver/bin/mlserver start <folder with settings.json, model-settings.json, this file>
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

DEFAULT_TOP_K = 5


class InvalidInput(MLServerError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=400)


class NextCharRuntime(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        artifact = Path(params.uri)
        extra = params.extra or {}
        manifest = json.loads((artifact / "manifest.json").read_text(encoding="utf-8"))
        self.vocab: list[str] = manifest["vocab"]
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.vocab_bytes = np.array([c.encode("utf-8") for c in self.vocab], dtype=object)
        self.state_shape = (int(manifest["state_layers"]), int(manifest["model"]["hidden_size"]))
        opts = ort.SessionOptions()
        # The settings nextchar measured best on 2 cores (server/backends/onnx.py) unless the
        # model settings say otherwise: a spinning ORT pool burns a core while idle.
        opts.intra_op_num_threads = int(extra.get("intra_op_threads", 1))
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(artifact / "model.onnx"), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self._run(["warm", "up"])
        return True

    def _run(self, texts: list[str]) -> np.ndarray:
        """texts -> next-char probabilities (N, V) float32."""
        n = len(texts)
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
        if n == 0 or lengths.min() < 1:
            raise InvalidInput("every text needs at least one character")
        ids = np.zeros((n, int(lengths.max())), dtype=np.int64)
        for row, text in enumerate(texts):
            try:
                ids[row, : len(text)] = [self.index[c] for c in text]
            except KeyError as e:
                raise InvalidInput(f"text[{row}]: character {e} is not in the vocabulary") from e
        state = np.zeros((self.state_shape[0], n, self.state_shape[1]), dtype=np.float32)
        (logits,) = self.session.run(["logits"], {"ids": ids, "lengths": lengths, "state": state})
        z = logits - logits.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z.astype(np.float32, copy=False)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {i.name: i for i in payload.inputs}
        if set(inputs) != {"text"}:
            raise InvalidInput("send one input, 'text' (BYTES [N])")
        texts = [t if isinstance(t, str) else t.decode("utf-8")
                 for t in StringCodec.decode_input(inputs["text"])]
        top_k = DEFAULT_TOP_K
        if payload.parameters is not None and getattr(payload.parameters, "top_k", None):
            top_k = int(payload.parameters.top_k)
        probs = self._run(texts)  # (N, V)
        n, v = probs.shape
        k = min(top_k, v)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k), as nextchar ranks
        top_probs = np.take_along_axis(probs, top, axis=1)
        outputs = [
            ResponseOutput(name="probs", datatype="FP32", shape=[n, v], data=probs.ravel().tolist()),
            ResponseOutput(name="top_ids", datatype="INT64", shape=[n, k], data=top.ravel().tolist()),
            ResponseOutput(name="top_chars", datatype="BYTES", shape=[n, k],
                           data=self.vocab_bytes[top.ravel()].tolist()),
            ResponseOutput(name="top_probs", datatype="FP32", shape=[n, k],
                           data=top_probs.ravel().tolist()),
        ]
        if payload.outputs:
            wanted = [o.name for o in payload.outputs]
            outputs = [o for o in outputs if o.name in wanted]
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
