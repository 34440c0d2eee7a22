# nextchar: `make demo` and `make test` are the two commands a new machine needs.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Install stamp: setup reruns pip only when pyproject.toml changes.
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_MINUTES ?= 1.5

.PHONY: setup proto proto-check lint test test-fast thin-venvs demo bench bench-ab bench-priority bench-tracing clean triton-venv tritonclient-test pytriton-venv gpu-venv gpu-check bench-peer bench-batch bench-generate compose-smoke fuzz fuzz-http reliability bench-http

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned: the CPU wheel on these machines satisfies it without a CUDA download.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Generated protobuf modules come from this one command and are committed; CI checks they match.
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I proto \
	  --python_out=proto --grpc_python_out=proto --pyi_out=proto \
	  $$(find proto -name '*.proto' | sort)

proto-check: proto
	git diff --exit-code -- proto || (echo "generated protobuf code is stale: run 'make proto' and commit" >&2; exit 1)

lint: setup
	$(BIN)/ruff check proto/nextchar/__init__.py server client training tests scripts bench deploy
	$(BIN)/mypy

# Thin installs prove the packaging: the plain client has no torch/onnxruntime/numpy, the
# [serve] server has no torch. Reinstalled when the package's sources change.
PKG_SOURCES := pyproject.toml $(shell find proto server client training -name '*.py' -o -name '*.proto' 2>/dev/null)

.venv-client/.installed: $(PKG_SOURCES)
	test -x .venv-client/bin/python || $(PY) -m venv .venv-client
	.venv-client/bin/python -m pip install -q --upgrade pip
	.venv-client/bin/python -m pip install -q .
	touch $@

.venv-serve/.installed: $(PKG_SOURCES)
	test -x .venv-serve/bin/python || $(PY) -m venv .venv-serve
	.venv-serve/bin/python -m pip install -q --upgrade pip
	.venv-serve/bin/python -m pip install -q '.[serve]'
	touch $@

thin-venvs: .venv-client/.installed .venv-serve/.installed

test: setup thin-venvs triton-venv
	$(BIN)/ruff check proto/nextchar/__init__.py server client training tests scripts bench deploy
	$(BIN)/mypy
	NEXTCHAR_CLIENT_VENV=$(CURDIR)/.venv-client NEXTCHAR_SERVE_VENV=$(CURDIR)/.venv-serve \
	  $(BIN)/python -m pytest -q -ra

# KServe V2 compatibility is proven with the real Triton client. tritonclient pins protobuf<7
# (nextchar needs 7), so it lives in its own venv; tests/server/test_kserve.py runs
# tests/compat/triton_client_check.py in it against a live server (and builds it if missing),
# tests/server/test_http_clients.py tests/compat/triton_http_check.py (V2 REST).
TRITON_VENV ?= .venv-triton
$(TRITON_VENV)/.installed:
	test -x $(TRITON_VENV)/bin/python || $(PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q 'tritonclient[grpc,http]==2.73.0' 'numpy>=1.26'
	touch $@

triton-venv: $(TRITON_VENV)/.installed

tritonclient-test: setup triton-venv
	NEXTCHAR_TRITON_VENV=$(CURDIR)/$(TRITON_VENV) $(BIN)/python -m pytest -q -ra \
	  tests/server/test_kserve.py -k tritonclient

# The peer benchmark (docs/benchmarks.md "Peer benchmark"): nextchar, MLServer and Triton on the
# same graph (model_loop.onnx), each peer tuned per concurrency, then one load generator against
# all, alone on the CPUs (~16 min: ~9 tuning, ~6 comparing). Each peer lives in its own venv.
# MLServer 1.7.1: uvloop<0.21 (with 0.23 its worker pool dies at start).
MLSERVER_VENV ?= .venv-mlserver
$(MLSERVER_VENV)/.installed:
	test -x $(MLSERVER_VENV)/bin/python || $(PY) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q 'mlserver==1.7.1' 'uvloop<0.21' 'onnxruntime>=1.20' 'numpy>=1.26'
	touch $@

# Triton through NVIDIA PyTriton 0.7.0 (a Triton 2.51 server binary with the Python backend;
# numpy<2). Its Python-backend stub needs the venv's sitecustomize.py on CPython 3.11.7, which
# bench/pytriton_server.py writes (its docstring says why).
PYTRITON_VENV ?= .venv-pytriton
$(PYTRITON_VENV)/.installed: bench/pytriton_server.py
	test -x $(PYTRITON_VENV)/bin/python || $(PY) -m venv $(PYTRITON_VENV)
	$(PYTRITON_VENV)/bin/python -m pip install -q 'nvidia-pytriton==0.7.0' 'numpy<2' 'tritonclient[grpc]>=2.50' 'onnxruntime>=1.20'
	$(PYTRITON_VENV)/bin/python bench/pytriton_server.py --install-sitecustomize
	touch $@

pytriton-venv: $(PYTRITON_VENV)/.installed

# PEER_ARGS='--tuning docs/peer_tuning.json' skips the tuning and reuses that file's settings.
PEER_ARGS ?= --tune-out docs/peer_tuning.json
bench-peer: setup $(MLSERVER_VENV)/.installed $(PYTRITON_VENV)/.installed
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/peer_bench.py \
	  --mlserver-venv $(MLSERVER_VENV) --pytriton-venv $(PYTRITON_VENV) $(PEER_ARGS) \
	  --out docs/peer_bench.json --md docs/peer_bench.md

# CUDA (scripts/gpu_check.sh): the onnx backend on CUDA needs onnxruntime-gpu, which ships the
# same `onnxruntime` package as the CPU wheel, so it gets its own venv: the dev install with
# onnxruntime swapped for onnxruntime-gpu (+ NVIDIA's CUDA and cuDNN wheels, ~1.5 GB), the same
# requirement as docker/Dockerfile's server-cuda image. torch is what the dev extra pins.
GPU_VENV ?= .venv-gpu
ORT_GPU ?= onnxruntime-gpu[cuda,cudnn]>=1.23
$(GPU_VENV)/.installed: pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -e '.[dev]'
	$(GPU_VENV)/bin/python -m pip uninstall -q -y onnxruntime
	$(GPU_VENV)/bin/python -m pip install -q '$(ORT_GPU)'
	touch $@

gpu-venv: $(GPU_VENV)/.installed

# The cuda-marked tests (per backend) and bench/gpu_bench.py; skips, never fails, without CUDA.
gpu-check: gpu-venv
	PY=$(GPU_VENV)/bin/python scripts/gpu_check.sh

# Without the thin-install checks (quicker while developing).
test-fast: setup
	$(BIN)/python -m pytest -q -ra -x

demo: setup
	$(BIN)/python scripts/demo.py --workdir $(DEMO_DIR) --max-minutes $(DEMO_MINUTES)

# The serving benchmark (issue 4), alone on the CPUs; ~8 min. Writes docs/serving_bench.{md,json,png}.
bench: setup
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/serving_bench.py --out docs

# The serving core against the code this session started from (issue 13's no-regression A/B):
# nextchar.v1 and KServe loads, interleaved, alone on the CPUs; ~6 min. Writes docs/ab_core.json.
AB_BASE ?= be64680
bench-ab: setup
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/ab_core.py --base $(AB_BASE) --out docs/ab_core.json

# Priority lanes: interactive Predict p99 idle vs under a `nextchar batch` job in the low lane and
# in the high lane (no lanes); ~3 min. Writes docs/priority_bench.json.
bench-priority: setup
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/priority_bench.py --out docs/priority_bench.json

# Tracing's cost per call: the same server with --otel off and on, interleaved; ~2 min.
bench-tracing: setup
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/tracing_bench.py --out docs/tracing_bench.json

# `nextchar batch` over 100k lines: one server, two server processes, --local (docs/benchmarks.md).
bench-batch: setup
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/batch_bench.py --out docs/batch_bench.json

# 64 Generate streams x 200 chars: step batching vs batching off vs re-sending the prefix, and
# the grpc.aio floor (bench/grpc_floor.py: the first character with no model and no nextchar
# code) (docs/benchmarks.md "Streaming generation"); about 4 minutes.
bench-generate: setup
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/generate_bench.py --out runs/bench-generate \
	  --json docs/generate_bench.json

# docker-compose.yml for real (docs/deploy.md): engine, base image, wheels, build, train, serve,
# Predict from host and network, 2 replicas, batch job, teardown. Needs root; not in `make test`.
# -o: the lock's descriptor is not passed on, so the dockerd the smoke may start does not hold the
# lock after the smoke ends (it did once and blocked every benchmark).
compose-smoke: setup
	flock -s -o /tmp/nextchar-cpu.lock scripts/compose_smoke.sh

# Reliability figures (docs/reliability.md): >= 10k fuzzed requests against a live server, then
# overload at 2x capacity, SIGTERM under load, hot reload under load. Alone on the CPUs.
fuzz: setup
	flock -x /tmp/nextchar-cpu.lock env NEXTCHAR_FUZZ_EXAMPLES=2000 \
	  NEXTCHAR_FUZZ_REPORT=docs/fuzz.json $(BIN)/python -m pytest -q tests/server/test_fuzz.py

# The HTTP front end (docs/benchmarks.md "HTTP front end"): V2 REST vs V2 gRPC and vs MLServer's
# V2 REST (tuned per concurrency) on the peer benchmark's load, 64 OpenAI vs 64 gRPC streams; ~10 min.
bench-http: setup $(MLSERVER_VENV)/.installed
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/http_bench.py \
	  --mlserver-venv $(MLSERVER_VENV) --out docs/http_bench.json

# The HTTP front end's fuzz (docs/reliability.md "HTTP"): >= 6,000 property-based requests over
# every endpoint (KServe V2 REST, OpenAI completions, nextchar JSON, raw bytes, paths), only 4xx
# for bad input; writes docs/fuzz_http.json. A correctness check, not a timing: it takes the CPU
# lock shared (-s), so it never runs beside a benchmark (those hold it exclusively) but may
# beside other shared jobs (compose-smoke).
fuzz-http: setup
	flock -s /tmp/nextchar-cpu.lock env NEXTCHAR_FUZZ_HTTP_EXAMPLES=1000 \
	  NEXTCHAR_FUZZ_HTTP_REPORT=docs/fuzz_http.json $(BIN)/python -m pytest -q tests/server/test_fuzz_http.py

reliability: setup
	flock -x /tmp/nextchar-cpu.lock $(BIN)/python bench/reliability.py all --out docs/reliability.json

clean:
	rm -rf runs artifacts .pytest_cache
