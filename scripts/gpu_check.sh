#!/usr/bin/env bash
# CUDA checks for a GPU machine, under 5 minutes: the cuda-marked tests, then a short
# benchmark of the raw backends on the GPU against the CPU.
#
#   make gpu-check                  # builds .venv-gpu (onnxruntime-gpu + the dev install), runs this
#   scripts/gpu_check.sh            # with .venv-gpu when it exists, else .venv (make setup)
#   PY=.venv/bin/python scripts/gpu_check.sh
#
# The cuda tests are gated per backend (tests/conftest.py): torchscript needs a CUDA build of
# torch, onnx needs onnxruntime's CUDAExecutionProvider, which only onnxruntime-gpu has (no extra
# of pyproject.toml installs it: it ships the same `onnxruntime` package as the CPU wheel, hence
# its own venv, `make gpu-venv`). A backend that cannot run on CUDA here is skipped with the
# reason; on a CPU-only machine every cuda test skips and the benchmark says so; neither fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PY:-} ]]; then
  PY=.venv/bin/python
  [[ -x .venv-gpu/bin/python ]] && PY=.venv-gpu/bin/python
fi
echo "python: $PY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PY" - <<'PYEOF'
import importlib.util as u
if u.find_spec("torch"):
    import torch
    print("torch", torch.__version__, "cuda", torch.cuda.is_available())
else:
    print("torch: not installed")
if u.find_spec("onnxruntime"):
    import onnxruntime as ort
    providers = ort.get_available_providers()
    print("onnxruntime", ort.__version__, providers)
    if "CUDAExecutionProvider" not in providers:
        print("onnxruntime has no CUDAExecutionProvider: the onnx cuda tests skip (make gpu-venv)")
PYEOF
timeout 240 "$PY" -m pytest -q -m cuda -ra tests/ -p no:cacheprovider
timeout 120 "$PY" bench/gpu_bench.py
