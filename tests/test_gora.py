"""GoRA against independent computations: ranks against an allocation worked by hand, the budget against
LoRA's parameter count, B0 against numpy's pseudo-inverse projection of a full fine-tuning gradient taken by
plain autograd, the initial update's expected size against the hand-derived E ||G P_A||^2 = (r / d_in) ||G||^2,
and PEFT's own save / load. Its run through `fwlora train` and `fwlora predict` is test_loraone.py's
test_trains_through_the_cli_and_predicts[gora]."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import batch, tiny_bert
from test_loraone import base_name, built, factors, full_gradients, run_info

from fwlora.errors import MethodError, UserError
from fwlora.methods import get
from fwlora.methods.gora import fit_b, gora_ranks, importance
from fwlora.methods.gradients import find_lora_layers

SQUARE = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]


def test_ranks_follow_a_hand_computed_allocation():
    # shares a = (0.6, 0.3, 0.1); d = (8, 8, 12); LoRA's budget at r = 2: 2 (8 + 8 + 12) = 56 parameters.
    # x_m = clip(t a_m / sqrt(d_m), 1, 4): with c at its floor, 8 t (0.6 + 0.3) / sqrt(8) + 12 = 56 gives
    # t = 44 sqrt(8) / 7.2 = 17.285, so x = (3.667, 1.833, 0.499 -> 1). Floors (3, 1, 1) cost 44; 12 left: the
    # largest remainder, b's 0.833, fits (8); a's 0.667 no longer does (8 > 4); c's is 0. That spends 52: the 4
    # left take a swap, +12 on c with -8 on a or b (c cannot go below r_min, so no other sum is 4): b down adds
    # |1 - 1.833| - |2 - 1.833| = 0.667 to the distance from x, a down 1; c up adds 1 either way: b gives.
    dims = {"a": (4, 4), "b": (4, 4), "c": (8, 4)}
    ranks = gora_ranks({"a": 6.0, "b": 3.0, "c": 1.0}, dims, rank=2, r_min=1, r_max=4)
    assert ranks == {"a": 3, "b": 1, "c": 2}
    # a matrix hits its cap: a = 0.9 would take 4.5 ranks; capped at 4 (32), b and c share the other 24 as
    # 8 x_b + 12 x_c = 24 with x = t (0.05 / sqrt(8), 0.05 / sqrt(12)): x = (1.349, 1.101) -> (1, 1), 4 left;
    # b is at r_min, so the only swap that spends them is c up, a down
    assert gora_ranks({"a": 0.9, "b": 0.05, "c": 0.05}, dims, rank=2, r_min=1, r_max=4) == {"a": 3, "b": 1, "c": 2}
    # every matrix at its cap costs less than the budget: all at the cap; caps never exceed min(d_in, d_out)
    assert gora_ranks({"a": 1.0, "b": 1.0, "c": 1.0}, dims, rank=3, r_min=1, r_max=3) == {"a": 3, "b": 3, "c": 3}
    # a at its cap min(d_in, d_out) = 2 (84 of the budget 116), b and c (importance 0) at their floors (16): the 16
    # left go one rank each, by the remainder pass, in name order
    assert gora_ranks({"a": 1.0, "b": 0.0, "c": 0.0}, {"a": (2, 40), "b": (4, 4), "c": (4, 4)}, rank=2, r_min=1,
                      r_max=8) == {"a": 2, "b": 2, "c": 2}
    # order of the input does not matter; floors above the budget are refused
    assert gora_ranks(dict(reversed(list({"a": 6.0, "b": 3.0, "c": 1.0}.items()))), dims, 2, 1, 4) == ranks
    with pytest.raises(MethodError, match="r_min = 3 on every matrix costs more than LoRA's budget"):
        gora_ranks({"a": 1.0, "b": 1.0, "c": 1.0}, dims, rank=2, r_min=3, r_max=4)


def test_importance_is_mean_or_sum_of_w_times_g():
    w, g = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[3.0, 1.0], [-4.0, 9.0]])
    assert importance(w, g) == pytest.approx((3 + 2 + 2 + 0) / 4)
    assert importance(w, g, "sum") == pytest.approx(7.0)


def test_ranks_and_b0_against_autograd_and_numpy():
    gamma = 0.05
    method, model = built("gora", gamma=gamma)
    grads, reference = full_gradients(), tiny_bert()
    layers = find_lora_layers(model)
    expected_importance = {n: np.abs(reference.get_submodule(base_name(n)).weight.detach().numpy()
                                     * grads[base_name(n)]).mean() for n in layers}
    for n in layers:
        assert method.importances[n] == pytest.approx(expected_importance[n], rel=1e-9)
    dims = {n: (m.in_features, m.out_features) for n, m in layers.items()}
    assert method.ranks == gora_ranks(expected_importance, dims, rank=2, r_min=1, r_max=8)
    for name, layer in layers.items():
        b, a = factors(layer)
        r_m, d_in = a.shape
        assert r_m == method.ranks[name] and b.shape == (dims[name][1], r_m)
        assert layer.scaling["default"] == pytest.approx(2.0)  # LoRA's s at every rank
        projection = np.linalg.pinv(a) @ a  # onto A's row space
        expected = -gamma * math.sqrt(d_in / r_m) * grads[base_name(name)] @ projection
        np.testing.assert_allclose(2.0 * b @ a, expected, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(layer.get_base_layer().weight, reference.get_submodule(base_name(name)).weight)
    assert all(p.grad is None for p in model.parameters())


def test_the_budget_is_lora_s():
    method, model = built("gora", targets=SQUARE)  # every matrix 16 x 16: the budget is met exactly
    layers = find_lora_layers(model)
    spent = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    lora_size = 2 * sum(m.in_features + m.out_features for m in layers.values())
    assert spent == method.params() == method.budget == lora_size
    assert len(set(method.ranks.values())) > 1  # the allocation moved ranks
    method, model = built("gora")  # 16 x 16 and 16 x 24 matrices too: still exactly LoRA's
    spent = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert spent == method.params() == method.budget


def test_the_budget_is_met_exactly_on_minilm_shapes_at_the_least_distance():
    """MiniLM's 36 matrices (768 and 1,920 parameters a rank): every exact-budget assignment within one rank of
    the rounded ranks, found by brute force on a subset small enough to enumerate, is no closer to the
    continuous allocation than spend_exactly's; on the full model the budget is met exactly."""
    import itertools

    from fwlora.methods.ranks import round_ranks, spend_exactly

    gen = np.random.default_rng(0)
    kinds = {"q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384), "up": (384, 1536), "down": (1536, 384)}
    dims = {f"layer{i}.{k}": d for i in range(6) for k, d in kinds.items()}
    for trial in range(20):
        importances = {n: float(gen.gamma(0.5)) for n in dims}
        ranks = gora_ranks(importances, dims, rank=2, r_min=1, r_max=8)
        assert sum(r * sum(dims[n]) for n, r in ranks.items()) == 2 * sum(sum(d) for d in dims.values())
    for trial in range(30):
        names = sorted(gen.choice(sorted(dims), size=7, replace=False))
        cost = {n: sum(dims[n]) for n in names}
        cap, low = {n: 8 for n in names}, {n: 1 for n in names}
        ideal = {n: float(gen.uniform(1, 8)) for n in names}
        budget = int(sum(ideal[n] * cost[n] for n in names)) // 384 * 384
        start = round_ranks(ideal, cap, cost, budget, names)
        got = spend_exactly(start, ideal, low, cap, cost, budget)
        exact = [dict(zip(names, rs)) for rs in itertools.product(*[
            [r for r in (start[n] - 1, start[n], start[n] + 1) if low[n] <= r <= cap[n]] for n in names])
            if sum(r * cost[n] for n, r in zip(names, rs)) == budget]
        distance = lambda ranks: sum(abs(ranks[n] - ideal[n]) for n in names)  # noqa: E731
        if not exact:
            assert got == start
            continue
        assert sum(got[n] * cost[n] for n in names) == budget
        assert all(abs(got[n] - start[n]) <= 1 for n in names)
        assert distance(got) == pytest.approx(min(map(distance, exact)), abs=1e-9)


def test_the_initial_update_is_one_gradient_step_of_size_gamma_in_expectation():
    """E ||s B0 A0||_F^2 = gamma^2 ||G||_F^2 over random A: sqrt(d_in / r) undoes the projection's shrinkage."""
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(6, 24, generator=gen, dtype=torch.float64)
    gamma, s, r, draws = 0.05, 2.0, 3, 4000
    total = 0.0
    for _ in range(draws):
        a = (torch.rand(r, 24, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(24)  # Kaiming uniform
        total += float((s * fit_b(grad, a, gamma, s) @ a).pow(2).sum())
    assert total / draws / (gamma ** 2 * float(grad.pow(2).sum())) == pytest.approx(1.0, abs=0.03)


def test_save_load_round_trip_and_the_saved_ranks(tmp_path):
    from peft import PeftModel

    method, model = built("gora")
    method.attach(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter"))
    probe = batch(seed=5)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(**probe).logits, model(**probe).logits, rtol=1e-12, atol=1e-12)
    assert {n: m.r["default"] for n, m in find_lora_layers(loaded).items()} == method.ranks
    # a resumed run whose own pass gave other ranks takes the saved ones (the loop then loads the weights)
    method.save_state(tmp_path / "state")
    other, again = built("gora", gamma=0.08)
    other.attach(again)
    first = next(iter(other.ranks))
    other.ranks = {**other.ranks, first: other.ranks[first] + 1}
    assert other.load_state(tmp_path / "state") and other.ranks == method.ranks
    assert {n: m.r["default"] for n, m in find_lora_layers(again).items()} == method.ranks
    assert not other.load_state(tmp_path / "state")


def test_bounds_that_cannot_keep_the_budget_are_refused():
    cls = get("gora")
    with pytest.raises(UserError, match="gora-min-rank = 3 > the run's rank 2"):
        cls(cls.Settings(min_rank=3), run_info()).check()
    with pytest.raises(UserError, match="gora-max-rank = 1 < the run's rank 2"):
        cls(cls.Settings(max_rank=1), run_info()).check()
    with pytest.raises(MethodError, match="min_rank = 0: must be an integer >= 1"):
        cls.Settings(min_rank=0)
    assert cls.Settings().bounds(2) == (1, 8) and cls.Settings().bounds(8) == (4, 32)
    assert json.dumps(cls.defaults())  # flat settings, as the CLI and config files name them
    assert set(cls.defaults()) == {"gora_batches", "gora_gamma", "gora_min_rank", "gora_max_rank",
                                   "gora_importance_reduce"}
