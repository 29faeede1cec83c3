# Two entry points; both build .venv on first use.
#   make demo   run the embedded demo chain (no downloads beyond PyPI)
#   make test   run the test suite
# On a GPU machine pick its torch build: make TORCH_SPEC='torch==2.13.0' demo  (or any pip spec)
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
CORES      ?= 2
PYTEST_ARGS ?=

export PATH := $(abspath $(VENV))/bin:$(PATH)
# gptqmodel: no CUDA build on CPU machines; keep its CPU pool to our core count.
export BUILD_CUDA_EXT ?= 0
export GPTQMODEL_CPU_WORKERS ?= $(CORES)

.PHONY: demo test env clean
demo: $(VENV)/.installed
	snakemake --cores $(CORES)

test: $(VENV)/.installed
	python -m pytest $(PYTEST_ARGS)

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -e ".[test]"
	touch $@

clean:
	rm -rf data models evals results cache logs .snakemake
