# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment (.venv) when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The I/O tests also run with pydicom 2.4, the version inside Slicer 5.6-5.10: a second virtual environment that
# reuses .venv's packages (a .pth line) with only pydicom 2.4 of its own, which comes first on its path.
PYDICOM24 ?= .venv-pydicom24
PYDICOM24_VERSION ?= 2.4.4
# Slicer 5.6 and 5.8 run the extension on Python 3.9 with numpy 1.26 and pydicom 2.4.4: a CPython 3.9 (Debian 11's
# python3.9, or a pyenv 3.9 where Debian's archive is out of reach; Testing/py39/install.sh) with that stack runs
# the tests of the code that runs inside Slicer: I/O, networks and model folders, harmonization, training,
# evaluate, the Slicer-side jobs and dependency logic (slicer-core has no Python 3.9 wheel: the MRML tests run in
# .venv only). The slowest training cases are left to the main run (each also runs there).
PY39 ?= .py39
PY39_TESTS ?= Testing/Python/test_io.py Testing/Python/test_models.py Testing/Python/test_harmonize.py \
	Testing/Python/test_train.py Testing/Python/test_reproducibility.py Testing/Python/test_slicer_jobs.py \
	Testing/Python/test_python39.py Testing/Python/test_module_code.py
PY39_DESELECT ?= \
	--deselect "Testing/Python/test_models.py::test_head_reaches_a_kernel_sized_correction_quickly" \
	--deselect "Testing/Python/test_train.py::test_anatomy_is_kept" \
	--deselect "Testing/Python/test_train.py::test_best_checkpoint_and_consolidation" \
	--deselect "Testing/Python/test_train.py::test_each_method_and_schedule_lowers_its_loss[radiomicgan-dwt]" \
	--deselect "Testing/Python/test_train.py::test_each_method_and_schedule_lowers_its_loss[radiomicgan-fixed]" \
	--deselect "Testing/Python/test_train.py::test_each_method_and_schedule_lowers_its_loss[radiomicgan-dynamic]" \
	--deselect "Testing/Python/test_train.py::test_each_method_and_schedule_lowers_its_loss[radiomicgan-none]" \
	--deselect "Testing/Python/test_train.py::test_each_method_and_schedule_lowers_its_loss[pix2pix-none]"

.PHONY: demo test test-pydicom24 test-py39 bench clean

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

test: $(VENV)/.installed $(PYDICOM24)/.installed $(PY39)/.installed
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-pydicom24
	$(MAKE) --no-print-directory test-py39

test-pydicom24: $(PYDICOM24)/.installed
	$(PYDICOM24)/bin/python -m pytest -p no:cacheprovider Testing/Python/test_io.py

$(PY39)/.installed: Testing/py39/install.sh Testing/py39/requirements.txt Testing/py39/requirements-torch.txt
	bash Testing/py39/install.sh $(PY39)

test-py39: $(PY39)/.installed
	$(PY39)/bin/python -m pytest -p no:cacheprovider $(PY39_TESTS) $(PY39_DESELECT)

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_io_simulate.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_harmonize.py
	$(BIN)/python bench/bench_radiomics.py

clean:
	rm -rf $(VENV) $(PYDICOM24) $(PY39) demo_output bench_output
