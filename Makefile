# The two commands of README.md:
#   make quickstart   set up .venv, fetch the embedded assets, run `recalign reproduce --profile quick`
#   make test         set up .venv (if needed) and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: quickstart setup assets test test-fast clean-venv

quickstart: setup assets
	$(BIN)/recalign reproduce --profile quick --out runs/quick

setup: $(VENV)/.installed

# torch is pinned first: `torch==2.13.0` is the CPU build this machine has on disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

assets: setup
	$(BIN)/recalign assets fetch

test: setup
	$(BIN)/python -m pytest

# unit tests only (skips those that load the real SmolLM2 or train for long)
test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean-venv:
	rm -rf $(VENV)
