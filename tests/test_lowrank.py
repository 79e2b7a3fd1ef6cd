"""dW = s B A's SVD from its factors (methods/lowrank.py) against torch.linalg.svd of the dense product in float64,
PEFT's own get_delta_weight, and the end-of-run matrix table computed from the dense dW."""

from __future__ import annotations

import pytest
import torch
from conftest import lora, tiny_bert

from fwlora import analysis, models
from fwlora.lowrank import LowRank, lowrank_svd
from fwlora.methods.deltas import peft_delta


def factors(d_out: int, r: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, r, generator=gen, dtype=torch.float64),
            torch.randn(r, d_in, generator=gen, dtype=torch.float64))


def check_against_dense(b: torch.Tensor, a: torch.Tensor, scale: float, rank: int) -> None:
    dense = scale * (b.double() @ a.double())
    u, s, vh = lowrank_svd(b, a, scale)
    u_ref, s_ref, vh_ref = torch.linalg.svd(dense, full_matrices=False)
    k = s.numel()
    assert k == min(b.shape[1], *dense.shape) and u.dtype == s.dtype == vh.dtype == torch.float64
    tol = 1e-12 * float(s_ref[0])
    torch.testing.assert_close(s, s_ref[:k], rtol=0, atol=tol)  # the same spectrum, largest first
    assert all(float(v) <= tol for v in s_ref[k:])  # and the dense one has nothing beyond it
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense, rtol=0, atol=tol)  # it rebuilds dW
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    for j in range(rank):  # distinct nonzero singular values: the same directions up to sign
        assert abs(float(u[:, j] @ u_ref[:, j])) == pytest.approx(1.0, abs=1e-9)
        assert abs(float(vh[j] @ vh_ref[j])) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("d_out, r, d_in, scale", [(20, 4, 30, 0.7), (30, 6, 12, -2.0), (3, 5, 7, 1.5)])
def test_the_spectrum_and_vectors_are_the_dense_svd_s(d_out, r, d_in, scale):
    b, a = factors(d_out, r, d_in)
    check_against_dense(b, a, scale, rank=min(r, d_out, d_in))


def test_a_rank_deficient_product():
    b, a = factors(25, 5, 18, seed=1)
    b[:, 3] = 2.0 * b[:, 0]  # B has rank 4
    a[4] = 0.0  # and A's last row adds nothing: dW has rank 3
    check_against_dense(b, a, 0.5, rank=3)
    s = lowrank_svd(b, a, 0.5)[1]
    assert int((s > 1e-10 * s[0]).sum()) == 3 == int(torch.linalg.matrix_rank(0.5 * b @ a))


def test_float32_factors_give_float64_and_a_difference_stays_low_rank():
    b, a = factors(16, 3, 10, seed=2)
    b0, a0 = factors(16, 3, 10, seed=3)
    u, s, vh = lowrank_svd(b.float(), a.float(), 2.0)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, torch.linalg.svdvals(2.0 * b.float().double() @ a.float().double())[:3], rtol=1e-12,
                               atol=0)
    diff = LowRank(b, a, 2.0) - LowRank(b0, a0, 0.5)  # an update measured from a non-zero start
    assert isinstance(diff, LowRank) and diff.a.shape == (6, 10)
    torch.testing.assert_close(diff.dense(), 2.0 * b @ a - 0.5 * b0 @ a0, rtol=0, atol=1e-12)
    torch.testing.assert_close(LowRank(b, a, 2.0) - 0.5 * b0 @ a0, diff.dense(), rtol=0, atol=1e-12)


def gpt2_lora():
    """A tiny GPT-2: its Conv1D layers store W as (d_in, d_out), so PEFT's LoRA there is fan_in_fan_out."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).double()
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=5.0, target_modules=["c_attn", "c_fc"],
                                                  fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def adalora_model():
    from peft import AdaLoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8.0,
                                                      target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_(0, 1.0)  # E starts at 0: give dW something to show
    return model


@pytest.mark.parametrize("build", [lambda: lora(tiny_bert(), r=3), gpt2_lora, adalora_model])
def test_the_factors_are_peft_s_own_delta_weight(build):
    model = build()
    layers = models.adapted_layers(model)
    assert layers
    for layer in layers.values():
        delta = peft_delta(layer, "default")
        assert delta is not None
        expected = layer.get_delta_weight("default").double()
        assert delta.shape == tuple(expected.shape)
        torch.testing.assert_close(delta.dense(), expected, rtol=1e-12, atol=1e-14)


def test_the_matrix_table_from_factors_is_the_dense_one():
    model = lora(tiny_bert(), r=3)
    factored = models.delta_weights(model)
    assert all(isinstance(d, LowRank) for d in factored.values())
    dense = {n: d.dense() for n, d in factored.items()}
    got, ref = analysis.matrix_table(factored), analysis.matrix_table(dense)
    for g, e in zip(got, ref, strict=True):
        assert (g["name"], g["shape"], g["numerical_rank"]) == (e["name"], e["shape"], e["numerical_rank"])
        assert g["fro_norm"] == pytest.approx(e["fro_norm"], rel=1e-12)
        assert g["effective_rank"] == pytest.approx(e["effective_rank"], rel=1e-9)
        k = len(g["singular_values"])
        assert k == 3 and g["singular_values"] == pytest.approx(e["singular_values"][:k], rel=1e-12)
        assert max(e["singular_values"][k:]) <= 1e-12 * e["singular_values"][0]  # the dense rest is round-off
