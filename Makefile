# Set-up and main commands. `make quick` runs the main job; `make test` runs the test suite (CI runs exactly it).
# torch is installed first and pinned (torch==2.13.0): which build comes (CPU or CUDA) is the wheel index's
# choice. On a normal Linux machine PyPI's default is a CUDA build (GBs); choose with TORCH_INDEX, e.g.
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu install       (CPU build)
#   make TORCH_INDEX=https://download.pytorch.org/whl/cu128 install     (CUDA 12.8)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fwlora-installed
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# GLUE: the shared local copy when it is there, else $FWLORA_DATA_DIR, else the hub (online only)
DATA_DIR ?= $(if $(wildcard ../shared/glue/sst2/train.tsv),../shared/glue,$(FWLORA_DATA_DIR))
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
# with local data every run is offline (no hub call, not even a version check); without, the hub is asked
OFFLINE := $(if $(DATA_DIR),HF_HUB_OFFLINE=1,)

.PHONY: install quick test bench-cpu bench-fwrank bench-edge overhead clean

include mk/backbones.mk

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_FLAGS) torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[experiments,dev]'
	touch $(STAMP)

quick: $(STAMP)  ## the README's main command: LoRA vs AdaLoRA vs FW-LoRA vs fwrank on real SST-2, minutes
	$(OFFLINE) $(BIN)/fwlora bench --preset quick --output-dir runs/quick $(DATA_FLAG)

test: $(STAMP)   ## the test suite (CI runs exactly this)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench-cpu: $(STAMP)  ## release 1's results (hours on 2 CPU cores; resumable)
	$(OFFLINE) $(BIN)/fwlora bench --preset cpu --output-dir runs/cpu $(DATA_FLAG)

bench-fwrank: $(STAMP)  ## release 2's comparison: LoRA, AdaLoRA, FW-LoRA, fwrank on CoLA and SST-2 (hours; resumable)
	$(OFFLINE) $(BIN)/fwlora bench --preset fwrank --output-dir runs/fwrank $(DATA_FLAG)

bench-edge: $(STAMP)  ## release 3's decomposition of AdaLoRA's edge (hours; resumable)
	$(OFFLINE) $(BIN)/fwlora bench --preset adalora_edge --output-dir runs/adalora-edge $(DATA_FLAG)

overhead: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/overhead.py $(DATA_FLAG)

clean:
	rm -rf $(VENV) runs
