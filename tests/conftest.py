"""Shared fixtures: tiny random models (fast, float64-capable), the shared GLUE copy, offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait ~25 s on a hub that cannot be reached
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = Path(os.environ.get("FWLORA_TEST_GLUE", REPO.parent / "shared" / "glue"))
TARGETS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run with --threads changes torch's global thread count: give it back after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def glue_dir() -> Path:
    if not (SHARED_GLUE / "cola" / "train.tsv").is_file():
        pytest.skip(f"needs the shared GLUE copy at {SHARED_GLUE} (present in CI; absent in a user's clone)")
    return SHARED_GLUE


def tiny_bert(num_labels: int = 2, dtype: torch.dtype = torch.float64, arch: str = "bert", seed: int = 0,
              dropout: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    kw = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
              max_position_embeddings=40, num_labels=num_labels, hidden_dropout_prob=dropout,
              attention_probs_dropout_prob=dropout)
    if arch == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **kw))
    else:
        model = BertForSequenceClassification(BertConfig(**kw))
    return model.to(dtype)


def lora(model, r: int = 2, alpha: float = 4.0, targets=None, dropout: float = 0.0, rslora: bool = False,
         init_b: bool = True, seed: int = 0):
    """A PEFT LoRA model; B gets random values (init_b) so that dW and the penalty are not zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or TARGETS, lora_dropout=dropout,
                        use_rslora=rslora, modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    if init_b:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return peft_model


def batch(n: int = 8, length: int = 7, vocab: int = 50, seed: int = 0, num_labels: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    for i, L in enumerate(lengths):
        mask[i, L:] = 0
        ids[i, L:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (n,), generator=gen)}
