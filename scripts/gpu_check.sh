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
    else:
        # onnxruntime-gpu finds the CUDA/cuDNN libraries of the nvidia-* wheels only after
        # onnxruntime.preload_dlls(directory='') (or with them on LD_LIBRARY_PATH), which the server
        # does not call: say what each way loads here (no GPU: libcuda.so.1, the driver, is missing).
        import glob, re, subprocess, sys
        model = sorted(glob.glob("runs/**/model.onnx", recursive=True))
        probe = ("import sys, onnxruntime as o\n"
                 "if sys.argv[2] == 'preload': o.preload_dlls(directory='')\n"
                 "s = o.InferenceSession(sys.argv[1], providers=['CUDAExecutionProvider'])\n"
                 "print(s.get_providers()[0])")
        for how in ("plain", "preload"):
            if not model:
                break
            r = subprocess.run([sys.executable, "-c", probe, model[0], how], capture_output=True, text=True)
            missing = re.findall(r"with error: (\S+?):", r.stderr)
            print(f"CUDA session ({how}): runs on {r.stdout.strip() or 'nothing'}"
                  + (f"; cannot load {missing[0]}" if missing else ""))
PYEOF
timeout 240 "$PY" -m pytest -q -m cuda -ra tests/ -p no:cacheprovider
timeout 120 "$PY" bench/gpu_bench.py
