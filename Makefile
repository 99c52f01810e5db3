# Routine tasks. `make demo` and `make test` work on a fresh machine: they create .venv and
# install what is missing first (torch from this machine's local wheels when none is installed).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test bench train evaluate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/spa demo

test: $(STAMP)
	$(BIN)/python -m pytest -q Testing

bench: $(STAMP)
	$(BIN)/spa bench

clean:
	rm -rf output .pytest_cache

# ----- how the shipped model and its model-card numbers were made (CPU, 2 cores) -------------------
DATA      ?= output/data/synth
TRAIN_OUT ?= output/train

$(DATA)/splits.json: | $(STAMP)
	$(BIN)/spa generate-data $(DATA) --cases 300 --seed 0

data: $(DATA)/splits.json

# The shipped default: token conditioning, full budget. Rerun after an interruption: it resumes.
train-default: $(DATA)/splits.json
	$(BIN)/spa train $(DATA) --out $(TRAIN_OUT)/token --steps 500 --batch-size 4 --samples 24 --rounds 6 --seed 0 --threads $(THREADS)

# Side by side at one small, equal budget: the paper's concat conditioning vs the default token one.
train-compare: $(DATA)/splits.json
	$(BIN)/spa train $(DATA) --out $(TRAIN_OUT)/compare_token --conditioning token --steps 60 --batch-size 2 --samples 8 --rounds 4 --seed 0 --best-of-n-weight 0.5 --deep-first-round-probability 1.0 --threads $(THREADS)
	$(BIN)/spa train $(DATA) --out $(TRAIN_OUT)/compare_concat --conditioning concat --steps 60 --batch-size 2 --samples 8 --rounds 4 --seed 0 --best-of-n-weight 0.5 --deep-first-round-probability 1.0 --threads $(THREADS)

THREADS ?= 2
.PHONY: data train-default train-compare
