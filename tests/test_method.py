"""FW-LoRA's math against independent references: autograd on the frozen weights, float64, explicit
B @ A products, hand-rolled EMAs (the Fisher statistic, the penalty and its gradients, the warm-up, the
normalisations, the grad scale). Its state, PEFT compatibility, model kinds and bad input are in
test_method_integration.py, which imports `base_weight_grads` from here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch, lora, tiny_bert

from fwlora import FisherWeightedLoRA, FWLoRAConfig, delta_weight_sq_norm


def base_weight_grads(peft_model, fw):
    """Switch autograd on for the frozen weights (the expensive reference FW-LoRA avoids)."""
    weights = {n: fw.layers[n].get_base_layer().weight for n in fw.names}
    for w in weights.values():
        w.requires_grad_(True)
    return weights


def test_fisher_after_one_step_equals_autograd_float64():
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=3, beta=0.9, measure_every=1, estimator="exact"))
    weights = base_weight_grads(model, fw)
    model(**batch()).loss.backward()
    fw.step()
    assert fw.steps_done == 1
    for name, w in weights.items():
        expected = (1 - 0.9) * w.grad.double().pow(2).sum().item()
        assert expected > 0
        assert fw.fisher[name] == pytest.approx(expected, rel=1e-6)


def test_fisher_is_an_ema_over_steps_with_training_in_between():
    torch.manual_seed(0)
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=10, beta=0.8, measure_every=1, estimator="exact"))
    weights = base_weight_grads(model, fw)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.5)
    ema = {n: 0.0 for n in fw.names}
    for step in range(4):
        model(**batch(seed=step)).loss.backward()
        for n, w in weights.items():
            ema[n] = 0.8 * ema[n] + 0.2 * w.grad.double().pow(2).sum().item()
            w.grad = None
        fw.step()
        opt.step()
        opt.zero_grad()
    for n in fw.names:
        assert fw.fisher[n] == pytest.approx(ema[n], rel=1e-6)


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_accumulation_gives_the_statistic_of_the_global_batch(estimator):
    full = batch(n=32, seed=3)
    config = FWLoRAConfig(warmup_steps=5, estimator=estimator, sketch_size=4, measure_every=1)
    one = lora(tiny_bert())
    fw_one = FisherWeightedLoRA(one, config)
    one(**full).loss.backward()
    fw_one.step()

    two = lora(tiny_bert())
    fw_two = FisherWeightedLoRA(two, config)
    for half in (slice(0, 16), slice(16, 32)):
        (two(**{k: v[half] for k, v in full.items()}).loss / 2).backward()
    fw_two.step()
    for n in fw_one.names:
        assert fw_two.fisher[n] == pytest.approx(fw_one.fisher[n], rel=1e-5)


def test_per_micro_batch_norms_would_differ():
    """The check above can fail: summing per-micro-batch norms (the wrong statistic) differs."""
    full = batch(n=32, seed=3)
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=5, measure_every=1, estimator="exact"))
    weights = base_weight_grads(model, fw)
    wrong = {n: 0.0 for n in fw.names}
    for half in (slice(0, 16), slice(16, 32)):
        (model(**{k: v[half] for k, v in full.items()}).loss / 2).backward()
        for n, w in weights.items():
            wrong[n] += w.grad.pow(2).sum().item()
            w.grad = None
    fw.step()
    assert any(abs(fw.fisher[n] / (0.02 * wrong[n]) - 1) > 1e-3 for n in fw.names)


def test_sketch_estimate_is_unbiased_and_tracks_exact():
    model = lora(tiny_bert())
    exact = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=500, beta=0.5, measure_every=1, estimator="exact"))
    model(**batch(n=16)).loss.backward()
    exact.step()
    exact.remove()
    estimates = []
    for seed in range(200):
        fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=500, beta=0.5, estimator="sketch", sketch_size=4, seed=seed, measure_every=1))
        model.zero_grad()
        model(**batch(n=16)).loss.backward()
        fw.step()
        fw.remove()
        estimates.append(fw.fisher)
    for n in exact.names:
        mean = sum(e[n] for e in estimates) / len(estimates)
        # 200 draws of a p=4 sketch: relative standard error <= sqrt(2/4/200) = 5 %
        assert mean == pytest.approx(exact.fisher[n], rel=0.2)


def test_measure_every_k_uses_beta_to_the_k():
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=6, beta=0.9, measure_every=3, estimator="exact"))
    weights = base_weight_grads(model, fw)
    expected = {n: 0.0 for n in fw.names}
    for step in range(6):
        model(**batch(seed=step)).loss.backward()
        if step % 3 == 0:
            for n, w in weights.items():
                expected[n] = 0.9**3 * expected[n] + (1 - 0.9**3) * w.grad.pow(2).sum().item()
        for w in weights.values():
            w.grad = None
        fw.step()
    for n in fw.names:
        assert fw.fisher[n] == pytest.approx(expected[n], rel=1e-6)


def explicit_penalty(model, fw, lam):
    """lambda * sum (1 - I_m) ||s B A||_F^2, materialising B @ A in float64."""
    total = 0.0
    for n in fw.names:
        layer = fw.layers[n]
        a = layer.lora_A["default"].weight.double()
        b = layer.lora_B["default"].weight.double()
        dw = layer.scaling["default"] * (b @ a)
        total = total + (1 - fw.importance[n]) * dw.pow(2).sum()
    return lam * total


@pytest.mark.parametrize("rslora,dropout", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_penalty_and_its_gradients_equal_the_explicit_form(rslora, dropout):
    model = lora(tiny_bert(dropout=dropout), r=3, alpha=5.0, rslora=rslora, dropout=dropout)
    model.train()
    fw = FisherWeightedLoRA(model, FWLoRAConfig(lambda_fw=0.3, warmup_steps=1, estimator="exact"))
    model(**batch()).loss.backward()
    fw.step()
    model.zero_grad()
    scaling = next(iter(fw.layers.values())).scaling["default"]
    assert scaling == pytest.approx(5.0 / math.sqrt(3) if rslora else 5.0 / 3)

    params = [p for n, p in model.named_parameters() if "lora_" in n]
    ours = fw.penalty()
    grads = torch.autograd.grad(ours, params)
    reference = explicit_penalty(model, fw, 0.3)
    ref_grads = torch.autograd.grad(reference, params)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-9, atol=1e-12)


def test_closed_form_gradients_of_the_gram_term():
    """docs/method.md: d/dB = 2 s^2 B (A A^T), d/dA = 2 s^2 (B^T B) A."""
    torch.manual_seed(0)
    a = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    s = 1.7
    value = delta_weight_sq_norm(a, b, s)
    assert value.item() == pytest.approx((s * b @ a).pow(2).sum().item(), rel=1e-12)
    ga, gb = torch.autograd.grad(value, (a, b))
    torch.testing.assert_close(gb, 2 * s**2 * b @ (a @ a.T))
    torch.testing.assert_close(ga, 2 * s**2 * (b.T @ b) @ a)


def test_penalty_is_of_dw_not_of_a_and_b():
    """Scaling A up and B down leaves ||dW|| (and the penalty) unchanged; ||A||^2 + ||B||^2 changes."""
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=1, estimator="exact"))
    model(**batch()).loss.backward()
    fw.step()
    before = fw.penalty().item()
    with torch.no_grad():
        for layer in fw.layers.values():
            layer.lora_A["default"].weight.mul_(4.0)
            layer.lora_B["default"].weight.div_(4.0)
    assert fw.penalty().item() == pytest.approx(before, rel=1e-10)


def test_warmup_boundary_and_frozen_importance():
    torch.manual_seed(0)
    model = lora(tiny_bert())
    k = 3
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=k, lambda_fw=1.0, measure_every=1, estimator="exact"))
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "lora_" in n], lr=0.1)
    for step in range(1, k + 1):
        penalty = fw.penalty()
        assert penalty.item() == 0.0 and not penalty.requires_grad  # no penalty through step K
        assert fw.importance == {}
        (model(**batch(seed=step)).loss + penalty).backward()
        fw.step()
        opt.step()
        opt.zero_grad()
    assert fw.steps_done == k and not fw.in_warmup
    importance, fisher = fw.importance, fw.fisher
    assert sum(importance.values()) == pytest.approx(1.0)
    assert importance == pytest.approx({n: f / sum(fisher.values()) for n, f in fisher.items()})
    assert fw.statistic.hooks._handles == []  # no measuring after warm-up: zero overhead
    for step in range(3):  # penalty from step K+1 on; F and I stay frozen
        penalty = fw.penalty()
        assert penalty.item() > 0 and penalty.requires_grad
        (model(**batch(seed=10 + step)).loss + penalty).backward()
        fw.step()
        opt.step()
        opt.zero_grad()
    assert fw.fisher == fisher and fw.importance == importance


def test_max_normalisation():
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=1, normalization="max", estimator="exact"))
    model(**batch()).loss.backward()
    fw.step()
    assert max(fw.importance.values()) == pytest.approx(1.0)
    top = max(fw.fisher, key=fw.fisher.get)
    assert fw.importance[top] == 1.0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_mean_normalisation_penalty_equals_a_float64_reference(gamma):
    """'mean': w_m = (mean F / F_m)^gamma (a spread-out penalty; gamma 0 = uniform weights), checked by
    materialising s B A in float64 and summing w_m ||dW_m||^2 by hand."""
    model = lora(tiny_bert(), alpha=6.0)
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=1, normalization="mean", gamma=gamma, lambda_fw=0.7, estimator="exact"))
    model(**batch()).loss.backward()
    model.zero_grad()
    fw.step()
    fisher = {n: v for n, v in fw.fisher.items()}
    mean = sum(fisher.values()) / len(fisher)
    assert sum(fw.importance.values()) / len(fisher) == pytest.approx(1.0)  # I_m = F_m / mean F
    want = 0.0
    for name, layer in fw.layers.items():
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        delta = layer.scaling["default"] * (b @ a)
        want += (mean / fisher[name]) ** gamma * float(delta.detach().square().sum())
    assert float(fw.penalty().detach()) == pytest.approx(0.7 * want, rel=1e-9)


def test_warmup_keeps_no_weight_gradients():
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=5, measure_every=1, estimator="exact"))
    model(**batch()).loss.backward()
    for layer in fw.layers.values():
        assert layer.get_base_layer().weight.grad is None
        assert not layer.get_base_layer().weight.requires_grad
    fw.step()
    assert fw.statistic._acc == {}  # accumulators freed at every step


def test_grad_scale_is_divided_out_and_overflow_steps_skipped():
    model = lora(tiny_bert())
    plain = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=5, measure_every=1, estimator="exact"))
    model(**batch()).loss.backward()
    plain.step()
    plain.remove()
    model.zero_grad()
    scaled = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=5, measure_every=1, estimator="exact"))
    (model(**batch()).loss * 1024.0).backward()
    scaled.step(grad_scale=1024.0)
    assert scaled.fisher == pytest.approx(plain.fisher, rel=1e-9)
    before = scaled.fisher
    (model(**batch()).loss * float("inf")).backward()
    scaled.step(grad_scale=1024.0)  # an overflowed step: the scaler skips it, and so does F
    assert scaled.fisher == before and scaled.steps_done == 2
