# Quickstart:  make run  (set up, then the default NR experiment)   |   make test  (set up, then the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/default

.PHONY: setup data run test test-all lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Fashion-MNIST comes from the Debian package dataset-fashion-mnist (IDX files in $(FMNIST)).
data:
	@if [ ! -d "$(FMNIST)" ] && [ -z "$$NR_JAX_FASHION_MNIST_DIR" ]; then \
	  echo "Fashion-MNIST missing: installing the Debian package dataset-fashion-mnist"; \
	  (apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update >/dev/null && apt-get install -y dataset-fashion-mnist >/dev/null)) || \
	  { echo "Could not install it. Run 'sudo apt-get install dataset-fashion-mnist', or set"; \
	    echo "NR_JAX_FASHION_MNIST_DIR to a folder holding the four Fashion-MNIST *-ubyte.gz files."; \
	    exit 1; }; \
	fi

run: setup data
	$(BIN)/python -m experiments.main --config experiments/configs/default.py --workdir $(WORKDIR)

test: setup data
	$(BIN)/python -m pytest -q

test-all: setup data
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: setup
	$(BIN)/ruff check nr_jax experiments tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
