"""fwrank's statistic, the per-matrix second moment M of the frozen weight's gradient, against autograd on
the frozen weights in float64 and FW-LoRA's exact F_m: measured every k steps, sketched (unbiased, that of
the global batch), float64 on every device, grad scale undone, and a NaN in the warm-up is divergence."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, lora, tiny_bert
from test_allocation import FF0

from fwlora import FisherWeightedLoRA, FWLoRAConfig, FWLoRAError
from fwlora.methods.fwrank import FisherRankAllocation, FWRankConfig


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
