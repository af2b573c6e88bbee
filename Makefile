# onestep: `make demo` runs the quick comparison, `make test` runs the test suite.
# Both create .venv (Python 3.11) and install the package with torch pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: setup demo test test-fast lint benchmarks gpu-wheels gpu-check-cpu clean

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

# Wheels of what the CUDA image lacks (POT, jsonargparse with its signature extras), for an offline GPU
# machine with Python 3.12: `bash benchmarks/gpu_check.sh --wheels .whl` there. Never committed (.gitignore).
GPU_WHEELS := pot==0.9.7.post1 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 importlib-resources==6.5.2
gpu-wheels: $(STAMP)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(GPU_WHEELS)

gpu-check-cpu: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH bash benchmarks/gpu_check.sh --cpu --out results/gpu_check_cpu

clean:
	rm -rf $(VENV) runs results .pytest_cache
