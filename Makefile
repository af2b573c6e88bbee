# onestep: `make demo` runs the quick comparison, `make test` runs the test suite.
# Both create .venv (Python 3.11) and install the package with torch pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: setup demo test test-fast lint benchmarks clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onestep benchmark --suite configs/suites/quick.yaml --out results/quick

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -x -q tests -m "not slow"

benchmarks: $(STAMP)
	$(PY) benchmarks/sampling_speed.py --threads 1
	$(PY) benchmarks/sample_overhead.py --threads 1
	$(PY) benchmarks/train_step_cost.py --threads 1
	$(PY) benchmarks/metric_cost.py --threads 1

clean:
	rm -rf $(VENV) runs results .pytest_cache
