"""fwrank against independent references: hand-computed allocations, torch.linalg.svd of B @ A, autograd on
the frozen weights in float64, FW-LoRA's exact F_m, and PEFT's own save / load / merge."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import batch, lora, tiny_bert

from fwlora import FisherWeightedLoRA, FWLoRAConfig, FWLoRAError
from fwlora.methods.fwrank import (FisherRankAllocation, FWRankConfig, allocate_proportional, allocate_spectrum,
                               refresh_optimizer, resize_lora_ranks)
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


# ---- the statistic ---------------------------------------------------------------------------------

def test_exact_statistic_equals_autograd_second_moment_and_fwlora_fisher():
    model = lora(tiny_bert(), r=2)
    fr = FisherRankAllocation(model, FWRankConfig(warmup_steps=10, beta=0.8, sketch_size=0, target_rank=2, measure_every=1))
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=10, beta=0.8, measure_every=1, estimator="exact"))
    weights = {n: layer.get_base_layer().weight for n, layer in fr.layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.5)
    ref = {n: 0.0 for n in weights}
    for step in range(3):
        model(**batch(seed=step)).loss.backward()
        for n, w in weights.items():
            g = w.grad.double()  # (d_out, d_in)
            ref[n] = 0.8 * ref[n] + 0.2 * (g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g)
            w.grad = None
        opt.step()
        assert fr.step() is False
        fw.step()
        opt.zero_grad()
    for n in weights:
        assert ref[n].abs().max() > 0
        torch.testing.assert_close(fr.moments[n], ref[n], rtol=1e-9, atol=1e-14)
        assert fr.fisher[n] == pytest.approx(fw.fisher[n], rel=1e-9)
    assert fr.moments[FF0].shape == (16, 16)  # d_in = 16 < d_out = 24: the d_in side


def test_measuring_every_k_steps_uses_beta_to_the_k_and_matches_fwlora():
    """measure_every=k folds only steps 1, 1+k, ... into M, with decay beta^k; the trace then equals FW-LoRA's
    F_m under the same schedule (an independent implementation of the same rule)."""
    model = lora(tiny_bert(), r=2)
    fr = FisherRankAllocation(model, FWRankConfig(warmup_steps=7, beta=0.9, sketch_size=0, target_rank=2, measure_every=3))
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=7, beta=0.9, measure_every=3, estimator="exact"))
    weights = {n: layer.get_base_layer().weight for n, layer in fr.layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    ref = {n: 0.0 for n in weights}
    for step in range(6):
        model(**batch(seed=step)).loss.backward()
        for n, w in weights.items():
            g = w.grad.double()
            if step % 3 == 0:
                ref[n] = 0.9**3 * ref[n] + (1 - 0.9**3) * (g @ g.T if g.shape[0] <= g.shape[1] else g.T @ g)
            w.grad = None
        fr.step()
        fw.step()
        model.zero_grad()
    for n in weights:
        torch.testing.assert_close(fr.moments[n], ref[n], rtol=1e-9, atol=1e-14)
        assert fr.fisher[n] == pytest.approx(fw.fisher[n], rel=1e-9)
    assert FWRankConfig(warmup_steps=500).measure_every == 8 and FWRankConfig(warmup_steps=5).measure_every == 5


def test_a_nan_in_the_warmup_is_divergence_not_a_user_error():
    from fwlora.errors import NonFiniteFisherError

    model = lora(tiny_bert(), r=2)
    fr = FisherRankAllocation(model, FWRankConfig(warmup_steps=3, target_rank=2, measure_every=1))
    for step in range(3):
        loss = model(**batch(seed=step)).loss
        (loss * float("nan") if step == 1 else loss).backward()
        model.zero_grad()
        if step < 2:
            fr.step()
    with pytest.raises(NonFiniteFisherError, match="non-finite during the warm-up") as info:
        fr.step()
    assert not isinstance(info.value, FWLoRAError)


def test_sketched_trace_is_an_unbiased_fisher_estimate():
    model = lora(tiny_bert(), r=2)
    exact = FisherRankAllocation(model, FWRankConfig(warmup_steps=5, sketch_size=0, target_rank=2, measure_every=1))
    sketch = FisherRankAllocation(model, FWRankConfig(warmup_steps=5, sketch_size=4000, seed=3, target_rank=2, measure_every=1))
    model(**batch()).loss.backward()
    exact.step(), sketch.step()
    for n in exact.names:
        assert sketch.fisher[n] == pytest.approx(exact.fisher[n], rel=0.15)
        rel = (sketch.moments[n] - exact.moments[n]).norm() / exact.moments[n].norm()
        assert rel < 0.2
    # a small sketch is noisy (this check can fail), but unbiased: its mean over seeds approaches the truth
    means = {n: 0.0 for n in exact.names}
    for seed in range(40):
        small = FisherRankAllocation(model, FWRankConfig(warmup_steps=5, sketch_size=2, seed=seed, target_rank=2, measure_every=1))
        model.zero_grad()
        model(**batch()).loss.backward()
        small.step()
        small.remove()
        for n in exact.names:
            means[n] += small.fisher[n] / 40
    errors = sorted(abs(means[n] / exact.fisher[n] - 1) for n in exact.names)
    assert errors[len(errors) // 2] < 0.2


def test_sketched_statistic_is_that_of_the_global_batch():
    full = batch(n=16, seed=3)
    config = FWRankConfig(warmup_steps=5, sketch_size=3, target_rank=2, measure_every=1)
    one = lora(tiny_bert(), r=2)
    fr_one = FisherRankAllocation(one, config)
    one(**full).loss.backward()
    fr_one.step()
    two = lora(tiny_bert(), r=2)
    fr_two = FisherRankAllocation(two, config)
    for half in (slice(0, 8), slice(8, 16)):
        (two(**{k: v[half] for k, v in full.items()}).loss / 2).backward()
    fr_two.step()
    for n in fr_one.names:
        torch.testing.assert_close(fr_two.moments[n], fr_one.moments[n], rtol=1e-6, atol=1e-14)


def test_the_statistic_is_float64_whatever_the_device():
    """M and the mean gradient in float64 on every device (they were float32 off the CPU): on the CPU and on a
    device that is not the CPU (meta: no data, but dtypes and shapes as on a GPU), and after a float32 step."""
    from fwlora.methods.gradients import stat_dtype

    assert stat_dtype(torch.device("cuda")) == stat_dtype(torch.device("cpu")) == torch.float64
    config = FWRankConfig(warmup_steps=3, sketch_size=2, target_rank=2, measure_every=1, rule="snr")
    model = lora(tiny_bert(dtype=torch.float32), r=2)
    fr = FisherRankAllocation(model, config)
    model(**batch()).loss.backward()
    fr.step()
    assert fr.moments and all(m.dtype == torch.float64 for m in fr.moments.values())
    assert fr._mean and all(m.dtype == torch.float64 for m in fr._mean.values())
    off_cpu = FisherRankAllocation(lora(tiny_bert(dtype=torch.float32), r=2).to("meta"), config)
    assert off_cpu.device.type == "meta" and all(m.dtype == torch.float64 for m in off_cpu.moments.values())


def test_grad_scale_is_undone_and_an_overflowed_step_is_skipped():
    config = FWRankConfig(warmup_steps=5, sketch_size=2, target_rank=2, measure_every=1, rule="snr")  # + E[G]
    plain, scaled = lora(tiny_bert(), r=2), lora(tiny_bert(), r=2)
    fr_plain, fr_scaled = FisherRankAllocation(plain, config), FisherRankAllocation(scaled, config)
    plain(**batch()).loss.backward()
    fr_plain.step()
    (scaled(**batch()).loss * 1024.0).backward()
    fr_scaled.step(grad_scale=torch.tensor(1024.0))
    for n in fr_plain.names:
        torch.testing.assert_close(fr_scaled.moments[n], fr_plain.moments[n], rtol=1e-6, atol=1e-20)
        torch.testing.assert_close(fr_scaled._mean[n], fr_plain._mean[n], rtol=1e-6, atol=1e-20)
    before = {n: m.clone() for n, m in fr_scaled.moments.items()}
    mean_before = {n: m.clone() for n, m in fr_scaled._mean.items()}
    (scaled(**batch(seed=1)).loss * float("inf")).backward()
    fr_scaled.step(grad_scale=1.0)
    assert fr_scaled.steps_done == 2
    assert all(torch.equal(fr_scaled.moments[n], before[n]) for n in before)
    assert all(torch.equal(fr_scaled._mean[n], mean_before[n]) for n in mean_before)


# ---- the whole method in a loop, and its state -------------------------------------------------------

def run(model, fr, steps, opt, start=0):
    resized_at = []
    for step in range(start, start + steps):
        model.train()
        model(**batch(seed=step)).loss.backward()
        opt.step()
        if fr.step():
            resized_at.append(step + 1)
            refresh_optimizer(opt, model)
        opt.zero_grad()
    return resized_at


@pytest.mark.parametrize("rule", ["spectrum", "proportional", "update"])
def test_loop_resizes_once_within_the_budget(rule):
    model = lora(tiny_bert(), r=3)
    fr = FisherRankAllocation(model, FWRankConfig(target_rank=2, warmup_steps=3, rule=rule, r_max=6, measure_every=1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert run(model, fr, 5, opt) == [3]
    cost = {n: sum(d) for n, d in fr.dims.items()}
    assert fr.budget == 2 * sum(cost.values())
    used = sum(fr.ranks[n] * cost[n] for n in fr.names)
    assert used <= fr.budget and fr.param_counts["after"] == used
    live = find_lora_layers(model)
    assert {n: live[n].r["default"] if n in live else 0 for n in fr.names} == fr.ranks
    if rule == "spectrum":  # nothing else fits: the largest allocation the greedy order allows
        assert all(fr.ranks[n] == 6 or cost[n] > fr.budget - used for n in fr.names)
        assert sorted(fr.gains[FF0], reverse=True) == fr.gains[FF0] and len(fr.gains[FF0]) == 16
    over = fr.trained_params_over_run(5)
    assert over["mean"] == pytest.approx((3 * over["warmup"] + 2 * over["after"]) / 5)


def test_update_rule_ranks_the_learned_update_and_keeps_its_top_directions():
    """rule="update": the gains are sigma_k^2 of s B A at step K (torch.linalg.svd of the materialised
    float64 product), at most the warm-up rank per matrix; every kept matrix becomes the truncated SVD of
    what it had learned, and the budget is that of the target rank."""
    model = lora(tiny_bert(), r=3)
    fr = FisherRankAllocation(model, FWRankConfig(target_rank=2, warmup_steps=3, rule="update", r_max=6,
                                                  measure_every=1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run(model, fr, 2, opt)
    model.train()
    model(**batch(seed=2)).loss.backward()
    opt.step()
    learned = {n: dw(m) for n, m in find_lora_layers(model).items()}  # the K-th update included
    assert fr.step()
    refresh_optimizer(opt, model)
    cost = {n: sum(d) for n, d in fr.dims.items()}
    for n, delta in learned.items():
        sigma = torch.linalg.svd(delta).S
        assert fr.gains[n] == pytest.approx((sigma[:3] ** 2).tolist(), rel=1e-9)
    assert allocate_spectrum(fr.gains, cost, fr.budget, 3) == fr.ranks  # the greedy, capped at the warm-up rank
    assert max(fr.ranks.values()) <= 3 and sum(fr.ranks[n] * cost[n] for n in fr.names) <= fr.budget
    assert len(set(fr.ranks.values())) > 1  # it did move the budget on this model
    live = find_lora_layers(model)
    for n, r in fr.ranks.items():
        if r:
            u, sigma, vh = torch.linalg.svd(learned[n])
            assert torch.allclose(dw(live[n]), (u[:, :r] * sigma[:r]) @ vh[:r], atol=1e-6)


def test_state_round_trip_mid_warmup(tmp_path):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    config = FWRankConfig(target_rank=2, warmup_steps=4, sketch_size=3, seed=1, measure_every=1)
    model = lora(tiny_bert(), r=3)
    fr = FisherRankAllocation(model, config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    run(model, fr, 2, opt)
    fr.save(tmp_path)
    fresh = lora(tiny_bert(), r=3)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    fr2 = FisherRankAllocation.from_pretrained(fresh, tmp_path)
    assert fr2.steps_done == 2 and fr2.fisher == pytest.approx(fr.fisher, rel=1e-12)
    opt2 = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.5)
    assert run(model, fr, 2, opt, start=2) == run(fresh, fr2, 2, opt2, start=2) == [4]
    assert fr2.ranks == fr.ranks
    for n in fr.names:
        assert fr2.gains[n] == pytest.approx(fr.gains[n], rel=1e-9, abs=1e-25)


def test_state_round_trip_after_the_resize(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    config = FWRankConfig(target_rank=1, warmup_steps=2, sketch_size=2, measure_every=1)
    model = lora(tiny_bert(), r=2)
    fr = FisherRankAllocation(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run(model, fr, 3, opt)
    assert 0 in fr.ranks.values()
    fr.save(tmp_path / "state")
    model.save_pretrained(tmp_path / "adapter")
    expected, shapes = logits(model), {n: p.shape for n, p in model.named_parameters()}
    # a fresh model at the warm-up shapes: loading re-applies the ranks, then the weights load into them
    fresh = lora(tiny_bert(), r=2)
    fr2 = FisherRankAllocation.from_pretrained(fresh, tmp_path / "state")
    assert fr2.ranks == fr.ranks and fr2.fisher == fr.fisher and not fr2.in_warmup
    assert {n: p.shape for n, p in fresh.named_parameters()} == shapes
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=1e-12)
    # a model rebuilt from the saved adapter already has these shapes: loading touches nothing
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter", is_trainable=True)
    fr3 = FisherRankAllocation.from_pretrained(loaded, tmp_path / "state")
    assert fr3.last_resize.new == [] and fr3.last_resize.removed == []
    assert fr3.step() is False
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-12)
    mid = FisherRankAllocation(lora(tiny_bert(), r=2), config).state_dict()
    with pytest.raises(FWLoRAError, match="warm-up shapes"):  # a mid-warm-up state needs the warm-up model
        FisherRankAllocation(loaded, config).load_state_dict(mid)


# ---- data parallelism: two gloo processes, each with half of the batch -------------------------------

def _dp_run(rank: int, world: int) -> tuple[dict, dict]:
    model = lora(tiny_bert(), r=3)
    fr = FisherRankAllocation(model, FWRankConfig(target_rank=2, warmup_steps=2, sketch_size=3, r_max=5, measure_every=1))
    tensors = {}
    for step in range(2):
        full = batch(n=8, seed=step)
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()} if world == 2 else full
        model(**half).loss.backward()  # no optimizer step: the processes' models stay identical
        if step == 0:
            fr.step()
            tensors |= {f"m:{n}": m.clone() for n, m in fr.moments.items()}
        else:
            torch.manual_seed(100 + rank)  # processes whose RNGs differ still get the same fresh directions
            assert fr.step()
    tensors |= {f"a:{n}": layer.lora_A["default"].weight.detach().clone() for n, layer in fr.layers.items()}
    return tensors, fr.ranks


def _dp_worker(rank: int, world: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        tensors, ranks = _dp_run(rank, world)
        save_file(tensors, f"{out}/rank{rank}.safetensors")
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(ranks))
        dist.barrier()  # neither process tears gloo down while the other still talks to it (a SIGABRT in CI)
    finally:
        dist.destroy_process_group()


def test_two_processes_with_half_batches_agree_with_one(tmp_path):
    import json

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_dp_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    (r0, r1), (ranks0, ranks1) = ([load_file(tmp_path / f"rank{k}.safetensors") for k in (0, 1)],
                                  [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)])
    one, ranks_one = _dp_run(0, 1)
    assert ranks0 == ranks1 == ranks_one
    for key, value in one.items():
        if key.startswith("m:"):  # the statistic of the global batch, on every process
            torch.testing.assert_close(r0[key], value, rtol=1e-6, atol=1e-16)
            torch.testing.assert_close(r1[key], r0[key], rtol=0, atol=0)
        else:  # fresh directions are drawn once (process 0's) and shared
            torch.testing.assert_close(r1[key], r0[key], rtol=0, atol=0)
