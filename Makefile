# nextchar: `make demo` and `make test` are the two commands a new machine needs.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Install stamp: setup reruns pip only when pyproject.toml changes.
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_MINUTES ?= 1.5

.PHONY: setup proto proto-check lint test test-fast thin-venvs demo bench clean

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
	$(BIN)/ruff check proto/nextchar/__init__.py server client training tests scripts
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

test: setup thin-venvs
	$(BIN)/ruff check proto/nextchar/__init__.py server client training tests scripts
	NEXTCHAR_CLIENT_VENV=$(CURDIR)/.venv-client NEXTCHAR_SERVE_VENV=$(CURDIR)/.venv-serve \
	  $(BIN)/python -m pytest -q -ra

# Without the thin-install checks (quicker while developing).
test-fast: setup
	$(BIN)/python -m pytest -q -ra -x

demo: setup
	$(BIN)/python scripts/demo.py --workdir $(DEMO_DIR) --max-minutes $(DEMO_MINUTES)

bench: setup
	$(BIN)/python -m nextchar.server.bench --out docs

clean:
	rm -rf runs artifacts .pytest_cache
