#!/usr/bin/env bash
# CUDA checks for a GPU machine, under 5 minutes: the cuda-marked tests, then a short
# benchmark of the raw backends on the GPU against the CPU.
#
#   scripts/gpu_check.sh            # uses .venv (make setup); CUDA torch and/or onnxruntime-gpu
#
# On a CPU-only machine the cuda tests skip and the benchmark says so; it never fails for that.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PY" - <<'PYEOF'
import importlib.util as u
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
if u.find_spec("onnxruntime"):
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
PYEOF
timeout 240 "$PY" -m pytest -q -m cuda -ra tests/ -p no:cacheprovider
timeout 120 "$PY" bench/gpu_bench.py
