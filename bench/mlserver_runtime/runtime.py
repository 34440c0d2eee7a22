"""A Seldon MLServer custom runtime serving a nextchar artifact's ONNX graph on ONNX Runtime.

The MLServer peer of docs/benchmarks.md ("Peer benchmark"). It answers the same V2 tensors as
nextchar's own KServe endpoint (docs/kserve.md), so one load generator sends byte-identical
requests to both:

    input   text BYTES [N]
    params  top_k (int64_param; absent = 5, nextchar's default)
    outputs probs FP32 [N, V], top_ids INT64 [N, k], top_chars BYTES [N, k], top_probs FP32 [N, k]

model-settings.json `parameters.extra`: `graph` ("loop": model_loop.onnx with positions=False,
the graph nextchar serves on CPU; "standard": model.onnx) and `intra_op_threads`. The model
itself is bench/peer_model.py, copied beside this file by bench/peer_bench.py. It runs in
MLServer's own venv (.venv-mlserver: mlserver 1.7.1, onnxruntime, numpy) and never imports
nextchar. MLServer's adaptive batching merges concurrent requests into one `predict` call along
the first axis.

    .venv-mlserver/bin/mlserver start <folder with settings.json, model-settings.json, this file>
"""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from peer_model import BadText, PeerModel

DEFAULT_TOP_K = 5


class InvalidInput(MLServerError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=400)


class NextCharRuntime(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = params.extra or {}
        self.model = PeerModel(params.uri, graph=extra.get("graph", "loop"),
                               intra_op_threads=int(extra.get("intra_op_threads", 1)))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        inputs = {i.name: i for i in payload.inputs}
        if set(inputs) != {"text"}:
            raise InvalidInput("send one input, 'text' (BYTES [N])")
        texts = [t if isinstance(t, str) else t.decode("utf-8")
                 for t in StringCodec.decode_input(inputs["text"])]
        top_k = DEFAULT_TOP_K
        if payload.parameters is not None and getattr(payload.parameters, "top_k", None):
            top_k = int(payload.parameters.top_k)
        try:
            probs = self.model.probs(texts)  # (N, V)
        except BadText as e:
            raise InvalidInput(str(e)) from e
        n, v = probs.shape
        top, top_probs = self.model.top(probs, top_k)  # (N, k)
        k = top.shape[1]
        outputs = [
            ResponseOutput(name="probs", datatype="FP32", shape=[n, v], data=probs.ravel().tolist()),
            ResponseOutput(name="top_ids", datatype="INT64", shape=[n, k], data=top.ravel().tolist()),
            ResponseOutput(name="top_chars", datatype="BYTES", shape=[n, k],
                           data=self.model.vocab_bytes[top.ravel()].tolist()),
            ResponseOutput(name="top_probs", datatype="FP32", shape=[n, k],
                           data=top_probs.ravel().tolist()),
        ]
        if payload.outputs:
            wanted = [o.name for o in payload.outputs]
            outputs = [o for o in outputs if o.name in wanted]
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
