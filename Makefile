# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment (.venv) when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pyradiomics ships as an sdist that only builds against the installed numpy (no build isolation)
	$(BIN)/python -m pip install --quiet numpy versioneer setuptools wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation pyradiomics
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/radiomicgan demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_io_simulate.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_harmonize.py
	$(BIN)/python bench/bench_radiomics.py

clean:
	rm -rf $(VENV) demo_output bench_output
