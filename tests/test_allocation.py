"""fwrank's building blocks against independent references: the allocation rules on hand-computed
examples, the resize against torch.linalg.svd of B @ A and PEFT's own save / load / merge, and the
optimizer carry-over. The statistic is in test_allocation_statistic.py, the method as it runs in
test_allocation_loop.py; both import the helpers below."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, lora, tiny_bert

from fwlora import FWLoRAError
from fwlora.methods.fwrank import (FWRankConfig, allocate_proportional, allocate_spectrum, refresh_optimizer,
                                   resize_lora_ranks)
from fwlora.methods.gradients import find_lora_layers

PREFIX = "base_model.model.bert.encoder.layer."
Q0, V0, FF0, OUT0 = (PREFIX + "0." + s for s in ("attention.self.query", "attention.self.value",
                                                 "intermediate.dense", "output.dense"))


def dw(layer, adapter="default"):
    return layer.scaling[adapter] * (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double())


def logits(model, seed=5):
    model.eval()
    with torch.no_grad():
        return model(**batch(seed=seed)).logits


# ---- allocation rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", [allocate_spectrum, allocate_proportional])
def test_rules_do_not_depend_on_dict_order(rule):
    stat = {"a": [8.0, 2.0, 1.0], "b": [30.0, 6.0], "c": [4.0, 4.0, 0.5]}
    if rule is allocate_proportional:
        stat = {n: sum(v) for n, v in stat.items()}
    cost = {"a": 10, "b": 20, "c": 10}
    reverse = dict(reversed(list(stat.items())))
    assert rule(stat, cost, 60, 2) == rule(reverse, dict(reversed(list(cost.items()))), 60, 2)


def test_spectrum_hand_example():
    # scores lambda / cost: b0 1.5, a0 .8, c0 .4, c1 .4, b1 .3, a1 .2, a2 .1 (capped by r_max=2), c2 .05
    gains = {"a": [8.0, 2.0, 1.0], "b": [30.0, 6.0], "c": [4.0, 4.0, 0.5]}
    cost = {"a": 10, "b": 20, "c": 10}
    # b0 (left 40), a0 (30), c0 (20), c1 (10), b1 does not fit, a1 (0): budget met exactly
    assert allocate_spectrum(gains, cost, 60, 2) == {"a": 2, "b": 1, "c": 2}
    # r_max = 3: a2 and c2 become grantable, but nothing is left after a1
    assert allocate_spectrum(gains, cost, 60, 3) == {"a": 2, "b": 1, "c": 2}
    # budget 75: b0 (55 left), a0 (45), c0 (35), c1 (25), b1 (5), then nothing fits: 70 of 75
    assert allocate_spectrum(gains, cost, 75, 3) == {"a": 1, "b": 2, "c": 2}
    # per-matrix caps, and a matrix left with rank 0
    assert allocate_spectrum(gains, cost, 40, {"a": 0, "b": 1, "c": 5}) == {"a": 0, "b": 1, "c": 2}
    assert allocate_spectrum(gains, cost, 9, 4) == {"a": 0, "b": 0, "c": 0}


def test_rank_floor_is_charged_first_then_the_rule_goes_on():
    gains = {"a": [8.0, 2.0, 1.0], "b": [30.0, 6.0], "c": [4.0, 4.0, 0.5]}
    cost = {"a": 10, "b": 20, "c": 10}
    # floor 1 each costs 40 of 60; left 20: scores of the grants above the floor (r_max 2): c1 .4, b1 .3, a1 .2
    # -> c1 (left 10), b1 does not fit (20), a1 (left 0)
    assert allocate_spectrum(gains, cost, 60, 2, r_min=1) == {"a": 2, "b": 1, "c": 2}
    # budget 45: c1 does not fit after the floor (5 left): every matrix exactly at the floor
    assert allocate_spectrum(gains, cost, 45, 3, r_min=1) == {"a": 1, "b": 1, "c": 1}
    # a cap below the floor wins (a matrix capped at 0 stays at 0, and costs nothing)
    assert allocate_spectrum(gains, cost, 40, {"a": 0, "b": 2, "c": 2}, r_min=1) == {"a": 0, "b": 1, "c": 2}
    # proportional: floor 1 each (40), the left 40 shared as F_m: t = 40 / (3*10 + 1*10 + 2*20) = 0.5 ->
    # ideal 1.5, 0.5, 1.0: floors 1, 0, 1 (30 used), a's remainder .5 fits (40): extra 2, 0, 1
    assert allocate_proportional({"a": 3.0, "b": 1.0, "c": 2.0}, {"a": 10, "b": 10, "c": 20}, 80, 8, r_min=1) == \
        {"a": 3, "b": 1, "c": 2}
    with pytest.raises(FWLoRAError, match="costs more than the budget"):
        allocate_spectrum(gains, cost, 30, 2, r_min=1)


def test_spectrum_ties_go_by_name():
    gains, cost = {"y": [5.0], "x": [5.0], "z": [5.0]}, {"x": 10, "y": 10, "z": 10}
    assert allocate_spectrum(gains, cost, 20, 1) == {"x": 1, "y": 1, "z": 0}
    # negative round-off gains count as 0 and are granted last, still within budget
    assert allocate_spectrum({"x": [1.0, -1e-12], "y": [2.0]}, {"x": 1, "y": 1}, 3, 4) == {"x": 2, "y": 1}


def test_proportional_hand_examples():
    cost = {"a": 10, "b": 10, "c": 20}
    # t = 80 / (30 + 10 + 40) = 1: ideal ranks are integers, budget met exactly
    assert allocate_proportional({"a": 3.0, "b": 1.0, "c": 2.0}, cost, 80, 8) == {"a": 3, "b": 1, "c": 2}
    # 5/3 each: floors 1,1,1 (30 used), remainders tie at 2/3 -> by name: a, b get +1
    assert allocate_proportional({"c": 1.0, "b": 1.0, "a": 1.0}, {"a": 10, "b": 10, "c": 10}, 50, 8) == \
        {"a": 2, "b": 2, "c": 1}
    # r_max: a's ideal 3.64 is capped at 3, the freed budget re-solved for b (1.0); F = 0 gets nothing
    assert allocate_proportional({"a": 10.0, "b": 1.0, "z": 0.0}, {"a": 10, "b": 10, "z": 1}, 40, 3) == \
        {"a": 3, "b": 1, "z": 0}
    # not exactly reachable: ideal 1.43 each; floors use 35, a's +1 fits (45), b's does not (cost 25 > 5)
    assert allocate_proportional({"a": 1.0, "b": 1.0}, {"a": 10, "b": 25}, 50, 8) == {"a": 2, "b": 1}
    # everything capped: all at r_max, below the budget
    assert allocate_proportional({"a": 1.0, "b": 2.0}, {"a": 10, "b": 10}, 100, 2) == {"a": 2, "b": 2}


@pytest.mark.parametrize("bad", [dict(target_rank=0), dict(warmup_steps=0), dict(beta=1.0), dict(rule="eva"),
                                 dict(r_max=0), dict(target_rank=4, r_max=2), dict(sketch_size=-1),
                                 dict(seed=1.5), dict(r_min=-1), dict(r_min=3, r_max=2),
                                 dict(target_rank=2, r_min=3)])
def test_config_checks(bad):
    with pytest.raises(FWLoRAError):
        FWRankConfig(**bad)


# ---- the resize --------------------------------------------------------------------------------------

def test_resize_keeps_the_function_when_ranks_cover_dw():
    model = lora(tiny_bert(), r=2)
    before = logits(model)
    layers = find_lora_layers(model)
    old = {n: (layer.lora_A["default"].weight, layer.scaling["default"]) for n, layer in layers.items()}
    ranks = {n: (2, 3, 5)[i % 3] for i, n in enumerate(layers)}
    report = resize_lora_ranks(model, ranks)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-12)
    for n, layer in layers.items():
        assert layer.r["default"] == ranks[n] and layer.lora_A["default"].weight.shape[0] == ranks[n]
        assert layer.scaling["default"] == old[n][1]  # s' = s, alpha_m = s r_m
        assert layer.lora_alpha["default"] == pytest.approx(old[n][1] * ranks[n])
        same = layer.lora_A["default"].weight is old[n][0]
        assert same == (ranks[n] == 2)
        assert (n + ".lora_A.default.weight" in report.kept) == (ranks[n] == 2)
        if ranks[n] > 2:  # directions beyond rank(dW) = 2 are fresh LoRA directions: A random, B zero
            assert layer.lora_A["default"].weight[2:].abs().min() > 0
            assert layer.lora_B["default"].weight[:, 2:].abs().max() == 0
            assert layer.lora_A["default"].weight.requires_grad
    assert set(report.new) == {n + f".lora_{ab}.default.weight" for n in layers if ranks[n] != 2 for ab in "AB"}


def test_shrinking_gives_the_best_rank_r_approximation():
    model = lora(tiny_bert(), r=3)
    layers = find_lora_layers(model)
    original = dw(layers[FF0]).clone()
    u, s, vh = torch.linalg.svd(original)  # independent reference: full SVD of s B A
    best = u[:, :1] @ torch.diag(s[:1]) @ vh[:1]
    assert (best - original).norm() > 1e-3 * original.norm()  # rank 3 -> 1 loses something
    untouched = dw(layers[V0]).clone()
    resize_lora_ranks(model, {FF0: 1})
    torch.testing.assert_close(dw(layers[FF0]), best, rtol=0, atol=1e-12)
    torch.testing.assert_close(dw(layers[V0]), untouched, rtol=0, atol=0)
    assert model.peft_config["default"].rank_pattern[FF0.removeprefix("base_model.model.").replace(".", r"\.")] == 1


def test_rank_zero_puts_the_base_layer_back():
    model = lora(tiny_bert(), r=2)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the function without Q0's adapter
        find_lora_layers(reference)[Q0].lora_B["default"].weight.zero_()
    base = find_lora_layers(model)[Q0].get_base_layer()
    report = resize_lora_ranks(model, {Q0: 0})
    assert model.get_submodule(Q0) is base and type(base) is torch.nn.Linear
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-12)
    assert Q0 + ".lora_A.default.weight" in report.removed and report.ranks_after[Q0] == 0
    assert Q0.removeprefix("base_model.model.") not in model.peft_config["default"].target_modules


def test_resize_keeps_the_adapters_dtype():
    model = lora(tiny_bert(), r=2)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    resize_lora_ranks(model, {FF0: 4, OUT0: 1})
    for name in (FF0, OUT0):
        layer = model.get_submodule(name)
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert layer.lora_B["default"].weight.dtype == torch.float32


def test_save_pretrained_from_pretrained_and_merge(tmp_path):
    from peft import PeftModel

    model = lora(tiny_bert(), r=2)
    layers = list(find_lora_layers(model))
    resize_lora_ranks(model, {layers[0]: 0, layers[1]: 1, layers[2]: 4, layers[4]: 3})
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-12)
    shapes = {n: p.shape for n, p in model.named_parameters() if "lora_" in n}
    assert {n: p.shape for n, p in loaded.named_parameters() if "lora_" in n} == shapes
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-10)


# ---- optimizer carry-over ---------------------------------------------------------------------------

class Wrapped:  # the shape of Accelerate's AcceleratedOptimizer
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_refresh_optimizer_keeps_state_and_trains_new_parameters():
    model = lora(tiny_bert(), r=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    model(**batch()).loss.backward()
    opt.step(), sched.step(), opt.zero_grad()
    layers = find_lora_layers(model)
    kept_param = layers[V0].lora_A["default"].weight
    kept_avg = opt.state[kept_param]["exp_avg"].clone()
    report = resize_lora_ranks(model, {FF0: 4, Q0: 0})
    refresh_optimizer(Wrapped(opt), model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert opt.param_groups[0]["params"] == trainable
    assert set(map(id, opt.state)) <= set(map(id, trainable))  # removed parameters' state dropped
    torch.testing.assert_close(opt.state[kept_param]["exp_avg"], kept_avg, rtol=0, atol=0)
    new = {n: p.detach().clone() for n, p in model.named_parameters() if n in report.new}
    assert new
    model.train()
    model(**batch(seed=1)).loss.backward()
    opt.step(), sched.step()
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in new.items())  # new parameters are trained
    assert opt.state[kept_param]["step"] == 2


def test_refresh_optimizer_with_several_groups():
    model = lora(tiny_bert(), r=2)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    opt = torch.optim.AdamW([{"params": lora_params}, {"params": head, "weight_decay": 0.0}], lr=1e-2)
    report = resize_lora_ranks(model, {FF0: 3})
    refresh_optimizer(opt, model)
    params = dict(model.named_parameters())
    assert {id(params[n]) for n in report.new} <= set(map(id, opt.param_groups[0]["params"]))
    assert opt.param_groups[1]["params"] == head
    assert len(opt.param_groups[0]["params"]) == len(lora_params)
