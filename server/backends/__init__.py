"""Backends run a padded batch through one model artifact; one module per runtime.

Each backend is declared once, in `BACKENDS`: its name (the `--backend` value and per-model
`config.json` "backend"), the model file it loads, optional files it verifies when the manifest
lists them, its platform name in KServe/Triton metadata, and where its class lives. Adding a
runtime is one entry here and one module beside this file. Classes are imported on first use,
so the ONNX server never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from .base import Backend, BatchOutput, DeviceUnavailable

if TYPE_CHECKING:
    from ..artifact import Artifact

__all__ = ["BACKENDS", "Backend", "BackendInfo", "BackendName", "BatchOutput", "DeviceUnavailable",
           "backend_info", "create_backend"]


@dataclass(frozen=True)
class BackendInfo:
    name: str
    model_file: str  # what `nextchar export` writes for this runtime
    platform: str  # KServe V2 / Triton metadata `platform`
    cls: str  # "module:Class", relative to this package
    optional_files: tuple[str, ...] = ()  # verified when the manifest lists them
    install_hint: str = ""


BACKENDS: dict[str, BackendInfo] = {
    b.name: b for b in (
        BackendInfo("onnx", "model.onnx", "onnxruntime_onnx", "onnx:OnnxBackend",
                    optional_files=("model_loop.onnx",),
                    install_hint="pip install 'nextchar[serve]'"),
        BackendInfo("torchscript", "model.ts", "pytorch_libtorch",
                    "torchscript:TorchScriptBackend", install_hint="pip install 'nextchar[torch]'"),
    )
}


# The `--backend` choices (settings.py types the field with it); kept equal to BACKENDS' keys.
BackendName = Literal["onnx", "torchscript"]
assert set(get_args(BackendName)) == set(BACKENDS), "BackendName must list every BACKENDS entry"


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r} ({' | '.join(BACKENDS)})") from None


def create_backend(artifact: Artifact, backend: str, device: str, **options: Any) -> Backend:
    """The backend class for `backend`, built on `artifact`; options are the runtime's own
    (workers, intra_op_threads, onnx_graph), each class takes what applies to it."""
    info = backend_info(backend)
    module_name, cls_name = info.cls.split(":")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DeviceUnavailable(f"the {backend} backend needs {e.name}: {info.install_hint}") from e
    cls: type[Backend] = getattr(module, cls_name)
    return cls(artifact, device, **options)
