"""A served model as Triton's model configuration, transport-free: the gRPC `ModelConfig` RPC
(grpc/kserve.py) and REST `GET /v2/models/{name}/config` (http/v2.py) answer with this one
dict, in the JSON form Triton's HTTP endpoint uses (proto field names, enum names, numbers as
numbers), so tools that read a Triton config (tritonclient's get_model_config, perf_analyzer)
see what this server takes:

    max_batch_size   max_texts_per_request: texts per request (the batch dimension)
    input            text TYPE_STRING [1] | ids TYPE_INT64 [-1] + lengths TYPE_INT64 [1] (optional)
    output           probs TYPE_FP32 [V] | top_ids, top_chars, top_probs [-1] (k per text)
    dynamic_batching max_queue_delay_microseconds: --max-batch-delay-ms; priority_levels 2
                     (priority 1 high, the default; 2 low)
    instance_group   one group: the backend's workers, on CPU or GPU
"""

from __future__ import annotations

from typing import Any

from .dataplane import ModelView


def model_config(m: ModelView) -> dict[str, Any]:
    def tensor(name: str, data_type: str, dims: list[int], **extra: Any) -> dict[str, Any]:
        return {"name": name, "data_type": data_type, "dims": dims, **extra}

    return {
        "name": m.name,
        "platform": m.platform,
        # Triton's backend names for these platforms: onnxruntime_onnx, pytorch_libtorch.
        "backend": m.platform.split("_")[0],
        # int32 in Triton's proto; a larger limit is no limit a client could reach anyway.
        "max_batch_size": min(m.limits.max_texts_per_request, 2**31 - 1),
        "input": [
            tensor("text", "TYPE_STRING", [1], optional=True),
            tensor("ids", "TYPE_INT64", [-1], optional=True),
            # [N] or [N, 1] on the wire; absent, every ids row is full width.
            tensor("lengths", "TYPE_INT64", [1], reshape={"shape": []}, optional=True),
        ],
        "output": [
            tensor("probs", "TYPE_FP32", [m.artifact.vocab_size]),
            tensor("top_ids", "TYPE_INT64", [-1]),
            tensor("top_chars", "TYPE_STRING", [-1]),
            tensor("top_probs", "TYPE_FP32", [-1]),
        ],
        "instance_group": [{"name": m.name, "count": m.workers,
                            "kind": "KIND_GPU" if m.device == "cuda" else "KIND_CPU"}],
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(m.max_batch_delay_ms * 1000),
            # The two lanes, as the `priority` parameter names them (v2_tensors.py).
            "priority_levels": 2, "default_priority_level": 1},
    }
