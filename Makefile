# sigil_exp — `make help` lists the targets. Two commands set up and check everything:
#   make demo     # creates .venv, then runs the main job on the embedded default (tiny Llama, CPU)
#   make test     # creates .venv if needed, then runs the fast test suite
PYTHON     ?= python3
VENV       ?= .venv
# The CPU build of torch by default (never a multi-GB CUDA download). GPU users point this at
# their own build, e.g. `make install TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
BIN        := $(VENV)/bin
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install demo test test-full test-slow lint bench-gpu bench-tiny sweep-demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create the virtualenv with torch (TORCH_SPEC) and the project

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	# pin the torch just installed so no dependency can pull another build
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: install  ## the main job on the embedded default: tiny Llama, 4-bit NF4, LoRA, 40 SFT steps on CPU
	$(BIN)/python -m sigil_exp experiment=smoke hydra.run.dir=outputs/demo/$$(date +%Y-%m-%d_%H-%M-%S)

test: install  ## fast test suite (a few minutes on 2 cores)
	$(BIN)/python -m pytest -q

test-slow: install  ## only the slow CPU tests (submitit launcher, longer runs)
	$(BIN)/python -m pytest -q -m "slow"

test-full: install  ## every CPU test (fast + slow)
	$(BIN)/python -m pytest -q -m "not gpu"

lint: install  ## ruff
	$(BIN)/ruff check sigil_exp tests

bench-gpu: install  ## GPU throughput/memory benchmark: naive recipe vs the presets (needs CUDA)
	$(BIN)/python -m sigil_exp.bench

bench-tiny: install  ## the benchmark's code path on CPU in seconds
	$(BIN)/python -m sigil_exp.bench --tiny

sweep-demo: install  ## a 2x2 rank x alpha sweep on the tiny model; the report lands in multirun/demo/report.md
	PYTHON=$(abspath $(BIN))/python bash multirun_examples/alpha.sh experiment=smoke train.max_steps=3 \
	  train.logging_steps=1 eval.enabled=false hydra.sweep.dir=multirun/demo

clean:  ## remove run outputs (keeps .venv)
	rm -rf outputs/20* outputs/demo multirun
