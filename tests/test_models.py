"""Target-module resolution, head handling and the AdaLoRA schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from fwlora import models
from fwlora.errors import UserError


def test_targets_cover_the_six_matrix_types_and_never_the_head():
    for arch in ("bert", "roberta"):
        model = tiny_bert(arch=arch)
        targets = models.resolve_targets(model)
        names = models.adapted_linear_names(model, targets)
        kinds = {n.split(".layer.")[1].split(".", 1)[1] for n in names}
        assert kinds == {"attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense"}
        assert len(names) == 6 * 2
        peft_model = models.build_peft_model(model, "lora", 2, targets, lora_alpha=4, lora_dropout=0.0)
        adapted = models.adapted_layers(peft_model)
        assert len(adapted) == 12 and not any("classifier" in n or "pooler" in n for n in adapted)
        head = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
        assert head and all("classifier" in n or "pooler" in n for n in head)


def test_unknown_architecture_lists_its_linear_layers():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
    with pytest.raises(UserError, match=r"no default target modules for architecture 'gpt2'.*--target-modules.*score"):
        models.resolve_targets(model)
    with pytest.raises(UserError, match="match no linear layer"):
        models.resolve_targets(tiny_bert(), ["nonexistent"])


def test_adalora_schedule_scales_the_authors_fractions():
    s = models.AdaLoraSchedule.scaled(804)
    assert (s.total_step, s.tinit, s.tfinal, s.deltaT) == (804, 96, 386, 1)  # 12 %, 48 %, every 0.15 %
    s = models.AdaLoraSchedule.scaled(50_500)
    assert (s.tinit, s.tfinal, s.deltaT) == (6060, 24240, 76)
    with pytest.raises(UserError, match="budgeting phase"):
        models.AdaLoraSchedule.scaled(10, tinit_frac=0.5, tfinal_frac=0.5)


def test_adalora_model_and_its_rank_pattern():
    model = models.build_peft_model(tiny_bert(), "adalora", 2, models.TARGET_MODULES["bert"], lora_alpha=12,
                                    lora_dropout=0.0, adalora=dict(total_step=10, tinit=1, tfinal=2, deltaT=1))
    layer = next(iter(models.adapted_layers(model).values()))
    assert layer.lora_A["default"].shape[0] == 3  # init_r = ceil(1.5 * 2)
    deltas = models.delta_weights(model)
    assert len(deltas) == 12 and all(float(d.abs().max()) == 0.0 for d in deltas.values())  # E starts at 0


def test_mean_pool_classifier_pools_over_the_mask_only():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16), add_pooling_layer=False).eval()
    model = models.MeanPoolClassifier(encoder, 3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = model.classifier(hidden[0, :3].mean(0))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[0], expected)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([2]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected[None], torch.tensor([2])))
