"""Triton's statistics extension, transport-free: ModelStatistics over gRPC (grpc/kserve.py) and
GET /v2/models[/{name}[/versions/{version}]]/stats over REST (http/v2.py) answer this one
document, Triton's JSON (numbers, not protobuf JSON's int64 strings), so the two agree.

    {"model_stats": [{"name", "version", "last_inference", "inference_count",
                      "execution_count", "inference_stats": {"success": {"count", "ns"}, ...},
                      "batch_stats": [{"batch_size", "compute_infer": {"count", "ns"}}]}]}
"""

from __future__ import annotations

from typing import Any

from .dataplane import DataPlane
from .stats import Duration

_ZERO = {"count": 0, "ns": 0}


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def model_statistics(plane: DataPlane, name: str = "", version: str = "") -> dict[str, Any]:
    """Every model's statistics (name empty: the version is ignored, as Triton does), or one
    model's; NotFound for a model or version not served."""
    return {"model_stats": [{
        "name": model, "version": served, "last_inference": st.last_inference_ms,
        "inference_count": st.inference_count, "execution_count": st.execution_count,
        # Triton's eight, zeros included, as perf_analyzer reads them: input and output
        # handling is measured inside compute_infer here, and there is no response cache.
        "inference_stats": {"success": _duration(st.success), "fail": _duration(st.fail),
                            "queue": _duration(st.queue), "compute_input": _ZERO,
                            "compute_infer": _duration(st.compute_infer),
                            "compute_output": _ZERO, "cache_hit": _ZERO, "cache_miss": _ZERO},
        "batch_stats": [{"batch_size": size, "compute_infer": _duration(d)}
                        for size, d in sorted(st.batches.items())],
    } for model, served, st in plane.statistics(name, version)]}
