# One virtual environment, created once and reused: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

export RAY_USAGE_STATS_ENABLED = 0
export MLFLOW_DISABLE_TELEMETRY = true

.PHONY: setup demo test bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package (root or sudo needed once).
$(FMNIST)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

demo: setup $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) -m pipeline.demo --quick

test: setup
	$(PY) -m pytest -q --durations=15

# Every benchmark, one after another, into BENCHMARKS.md (about an hour on 2 idle cores).
bench: setup $(FMNIST)/train-images-idx3-ubyte.gz
	$(PY) -m benchmarks.run_all

# The papers' speed claims on the first CUDA device (about 5 minutes on an H100/H200; says so and exits without one).
bench-gpu: setup
	$(PY) -m benchmarks.bench_gpu

clean:
	rm -rf $(VENV) build *.egg-info
