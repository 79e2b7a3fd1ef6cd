# Set-up and main commands. `make quick` runs the main job offline; `make test` runs the test suite.
# torch is installed first and pinned (constraints.txt): an unpinned `torch` would pull a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fwlora-installed
# GLUE: the shared local copy when it is there, else $FWLORA_DATA_DIR, else the hub (online only)
DATA_DIR ?= $(if $(wildcard ../shared/glue/cola/train.tsv),../shared/glue,$(FWLORA_DATA_DIR))
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

.PHONY: install quick test bench-cpu bench-fwrank overhead clean

include mk/backbones.mk

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[experiments,dev]'
	touch $(STAMP)

quick: $(STAMP)  ## the README's main command: LoRA vs AdaLoRA vs FW-LoRA on real GLUE, offline, minutes
	HF_HUB_OFFLINE=1 $(BIN)/fwlora bench --preset quick --output-dir runs/quick $(DATA_FLAG)

test: $(STAMP)   ## the test suite (CI runs exactly this)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench-cpu: $(STAMP)  ## the committed headline results (hours on 2 CPU cores; resumable)
	HF_HUB_OFFLINE=1 $(BIN)/fwlora bench --preset cpu --output-dir runs/cpu $(DATA_FLAG)

bench-fwrank: $(STAMP)  ## the release-2 comparison: LoRA, AdaLoRA, FW-LoRA, fwrank on CoLA and SST-2 (hours; resumable)
	HF_HUB_OFFLINE=1 $(BIN)/fwlora bench --preset fwrank --output-dir runs/fwrank $(DATA_FLAG)

overhead: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/overhead.py $(DATA_FLAG)

clean:
	rm -rf $(VENV) runs
