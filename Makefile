# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment (.venv) when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The I/O tests also run with pydicom 2.4, the version inside Slicer 5.6-5.10: a second virtual environment that
# reuses .venv's packages (a .pth line) with only pydicom 2.4 of its own, which comes first on its path.
PYDICOM24 ?= .venv-pydicom24
PYDICOM24_VERSION ?= 2.4.4

.PHONY: demo test test-pydicom24 bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pyradiomics ships as an sdist that only builds against the installed numpy (no build isolation)
	$(BIN)/python -m pip install --quiet numpy versioneer setuptools wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation pyradiomics
	# ComBat for cohort mode: neuroHarmonize and neuroCombat without their numpy<2 pin (see pyproject's combat extra)
	$(BIN)/python -m pip install --quiet --no-deps "neuroHarmonize==2.5.2" "neuroCombat==0.2.12"
	$(BIN)/python -m pip install --quiet -e ".[test,combat]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/radiomicgan demo

$(PYDICOM24)/.installed: $(VENV)/.installed
	rm -rf $(PYDICOM24)
	$(PYTHON) -m venv $(PYDICOM24)
	$(PYDICOM24)/bin/python -m pip install --quiet --no-deps "pydicom==$(PYDICOM24_VERSION)"
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$$($(PYDICOM24)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/radiomicgan-main-venv.pth"
	$(PYDICOM24)/bin/python -c "import pydicom, numpy, SimpleITK, pytest; assert pydicom.__version__ == '$(PYDICOM24_VERSION)', pydicom.__version__"
	touch $@

test: $(VENV)/.installed $(PYDICOM24)/.installed
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-pydicom24

test-pydicom24: $(PYDICOM24)/.installed
	$(PYDICOM24)/bin/python -m pytest -p no:cacheprovider Testing/Python/test_io.py

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_io_simulate.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_harmonize.py
	$(BIN)/python bench/bench_radiomics.py

clean:
	rm -rf $(VENV) $(PYDICOM24) demo_output bench_output
