"""The warm-up statistic both adaptive methods share (methods/gradients.py): pinned against release 2's
separate implementations, one definition of the shared settings, K as a fraction of the run, and the
signals fwrank measures for the new rules (the learned update's output energy, the gradient's SNR)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import batch, lora, tiny_bert

from fwlora import FisherRankAllocation, FisherWeightedLoRA, FWLoRAConfig, FWRankConfig
from fwlora.errors import MethodError
from fwlora.lowrank import LowRank
from fwlora.methods.ranks import output_energy
from fwlora.methods.gradients import WarmupConfig

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_statistics.json").read_text())


def fw_run(estimator: str) -> dict:
    torch.manual_seed(0)
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=6, beta=0.9, measure_every=2, estimator=estimator,
                                                sketch_size=3, seed=5))
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.3)
    for step in range(8):
        (model(**batch(seed=step)).loss + fw.penalty()).backward()
        fw.step()
        opt.step()
        opt.zero_grad()
    return {"fisher": fw.fisher, "penalty": float(fw.penalty())}


def fr_run(rule: str, sketch: int, **kw) -> FisherRankAllocation:
    torch.manual_seed(0)
    model = lora(tiny_bert(), r=3, alpha=6.0)
    fr = FisherRankAllocation(model, FWRankConfig(target_rank=2, warmup_steps=5, beta=0.9, measure_every=2,
                                                  sketch_size=sketch, seed=3, rule=rule, r_max=4, **kw))
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.3)
    for step in range(5):
        model(**batch(seed=step)).loss.backward()
        opt.step()
        fr.step()
        opt.zero_grad()
    return fr


@pytest.mark.parametrize("case", ["fw_sketch", "fw_exact", "fr_spectrum", "fr_update", "fr_prop"])
def test_the_shared_statistic_reproduces_release_2(case):
    """Values computed by release 2's two separate warm-up classes (tests/data/pinned_statistics.json, written
    by the pre-refactor code on this model and data): the refactor kept every operation."""
    pinned = PINNED[case]
    if case.startswith("fw"):
        got = fw_run(case.split("_")[1])
        assert got["penalty"] == pytest.approx(pinned["penalty"], rel=1e-9)
    else:
        rule, sketch = {"fr_spectrum": ("spectrum", 4), "fr_update": ("update", 4), "fr_prop": ("proportional", 0)}[case]
        fr = fr_run(rule, sketch)
        got = {"fisher": fr.fisher, "ranks": fr.ranks}
        assert got["ranks"] == pinned["ranks"]
    assert got["fisher"] == pytest.approx(pinned["fisher"], rel=1e-9)


def test_one_definition_of_the_shared_fields():
    shared = {f for f in WarmupConfig.__dataclass_fields__}
    assert shared == {"warmup_steps", "beta", "sketch_size", "measure_every", "seed"}
    assert shared <= set(FWLoRAConfig.__dataclass_fields__) and shared <= set(FWRankConfig.__dataclass_fields__)
    for cls in (FWLoRAConfig, FWRankConfig):  # the shared checks, once
        with pytest.raises(MethodError, match=rf"{cls.__name__}.beta = 1.5: must lie strictly between 0 and 1"):
            cls(beta=1.5)
        with pytest.raises(TypeError):
            cls(0.5)  # keyword-only: a positional value cannot slip into another field


def test_a_fraction_of_the_run_is_counted_in_steps():
    config = FWLoRAConfig(warmup_steps=0.25)
    assert config.measure_every is None and config.resolve(804).warmup_steps == 201
    assert config.resolve(804).measure_every == 8 and FWRankConfig(warmup_steps=0.52).resolve(250).warmup_steps == 130
    with pytest.raises(MethodError, match="a fraction of the run: pass total_steps="):
        config.resolve(None)
    with pytest.raises(MethodError, match="must be >= 1"):
        FWLoRAConfig(warmup_steps=1.5)
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, config)  # deferred: started when the run's length is known
    with pytest.raises(MethodError, match=r"call fw.start\(total_steps\)"):
        fw.step()
    fw.start(40)
    assert fw.config.warmup_steps == 10 and fw.in_warmup
    with pytest.raises(MethodError, match="warmup_steps = 10 >= the run's 8 optimizer steps"):
        FisherWeightedLoRA(lora(tiny_bert()), FWLoRAConfig(warmup_steps=10), total_steps=8)
    with pytest.raises(MethodError, match="the rank allocation would never happen"):
        FisherRankAllocation(lora(tiny_bert()), FWRankConfig(warmup_steps=0.9999), total_steps=3)


def test_a_state_saved_with_a_fractional_k_loads_into_an_unstarted_object(tmp_path):
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=0.5, measure_every=1), total_steps=4)
    for step in range(3):
        (model(**batch(seed=step)).loss + fw.penalty()).backward()
        fw.step()
        model.zero_grad()
    fw.save(tmp_path)
    again = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=0.5, measure_every=1))
    again.load(tmp_path)
    assert again.config.warmup_steps == 2 and again.fisher == fw.fisher and not again.in_warmup


def test_uniform_cuts_every_matrix_to_the_target_rank():
    fr = fr_run("uniform", 4)
    assert set(fr.ranks.values()) == {2} and fr.param_counts["after"] == fr.budget


def test_output_energy_equals_e_dw_x_squared_from_the_inputs():
    torch.manual_seed(1)
    a = torch.randn(3, 12, dtype=torch.float64)
    b = torch.randn(7, 3, dtype=torch.float64)
    x = torch.randn(50, 12, dtype=torch.float64)
    dw = 0.7 * b @ a
    energy = output_energy(LowRank(b, a, 0.7), a, (x @ a.T).T @ (x @ a.T), 50)
    assert sum(energy) == pytest.approx(float((x @ dw.T).square().sum(1).mean()), rel=1e-10)
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    assert energy == pytest.approx([float(s[k] ** 2 * (x @ vh[k]).square().mean()) for k in range(3)], rel=1e-9)


def test_the_signals_are_recorded_and_the_snr_lies_in_0_1():
    fr = fr_run("energy", 0, record_signals=True)
    assert set(fr.signals) == {"fisher", "snr", "update", "energy"}
    assert all(0 <= v <= 1 + 1e-9 for v in fr.signals["snr"].values())
    assert sum(fr.ranks[n] * sum(fr.dims[n]) for n in fr.ranks) <= fr.budget
    same = fr_run("spectrum", 0, record_signals=True)
    plain = fr_run("spectrum", 0)
    assert same.ranks == plain.ranks and same.fisher == plain.fisher  # measuring more changes nothing


def test_the_snr_is_the_ema_of_the_gradient_over_the_ema_of_its_norm():
    """Exact mode, measured every step, no training: the same gradient each step gives SNR 1; two batches in
    turn give ||E G||^2 / E ||G||^2 with the EMA's weights, from autograd on the frozen weights."""
    torch.manual_seed(0)
    model = lora(tiny_bert(), r=3, alpha=6.0)
    fr = FisherRankAllocation(model, FWRankConfig(target_rank=2, warmup_steps=2, beta=0.5, measure_every=1,
                                                  sketch_size=0, rule="snr", r_max=4))
    weights = {n: fr.layers[n].get_base_layer().weight for n in fr.names}
    for w in weights.values():
        w.requires_grad_(True)
    grads = []
    for step in range(2):
        model(**batch(seed=step)).loss.backward()
        grads.append({n: w.grad.double().clone() for n, w in weights.items()})
        for w in weights.values():
            w.grad = None
        fr.step()
        model.zero_grad()
    for n in fr.names:
        g1, g2 = grads[0][n], grads[1][n]
        mean = 0.5 * (0.5 * g1) + 0.5 * g2
        second = 0.5 * (0.5 * g1.square().sum()) + 0.5 * g2.square().sum()
        assert fr.signals["snr"][n] == pytest.approx(float(mean.square().sum() / second), rel=1e-9)
