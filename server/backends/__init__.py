"""Backends run a padded batch through one model artifact; one module per runtime.

`create_backend` imports only the runtime it needs: the ONNX server never imports torch.
"""

from __future__ import annotations

from ..artifact import Artifact
from .base import Backend, BatchOutput, DeviceUnavailable

__all__ = ["Backend", "BatchOutput", "DeviceUnavailable", "create_backend"]


def create_backend(
    artifact: Artifact,
    backend: str,
    device: str,
    workers: int = 0,
    intra_op_threads: int = 0,
    onnx_graph: str = "auto",
) -> Backend:
    if backend == "onnx":
        from .onnx import OnnxBackend

        return OnnxBackend(artifact, device, workers=workers, intra_op_threads=intra_op_threads,
                           graph=onnx_graph)
    if backend == "torchscript":
        try:
            from .torchscript import TorchScriptBackend
        except ImportError as e:  # pragma: no cover - depends on the install
            raise DeviceUnavailable(
                "the torchscript backend needs torch: pip install 'nextchar[torch]'"
            ) from e
        return TorchScriptBackend(artifact, device, intra_op_threads=intra_op_threads)
    raise ValueError(f"unknown backend {backend!r} (onnx | torchscript)")
