"""Spectral widecut against independent computations: the wide adapters' start against numpy's truncated SVD of
the full fine-tuning gradient (autograd on a separate copy, float64), the cut against the truncated SVD of what
was learned, the budget against LoRA's at the rank, and a run through the CLI with its pass timed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import batch, tiny_bert
from test_cli import error_line, tiny
from test_loraone import base_name, data_pass, factors, full_gradients, run_info

from fwlora.cli import main
from fwlora.errors import MethodError, UserError
from fwlora.methods import get

N_BATCHES = 3


def built(rank: int = 2, **settings):
    cls = get("specwide")
    method = cls(cls.Settings(batches=N_BATCHES, cut_at=2, target_rank=rank, **settings), run_info(rank))
    method.data = data_pass()
    torch.manual_seed(1)
    model = method.build(tiny_bert())
    method.attach(model)
    return method, model


def test_the_wide_adapters_start_from_the_stable_split_of_the_gradient_s_truncated_svd():
    gamma, width = 16.0, 3  # rank 2: the width is AdaLoRA's init_r, ceil(1.5 r)
    method, model = built(gamma=gamma)
    grads = full_gradients(N_BATCHES)
    assert method.width == width and len(method.captured) == 12
    for name, layer in method.cut.layers.items():
        assert float(layer.scaling["default"]) == pytest.approx(2.0)  # LoRA's alpha / r at the width
        u, s, vh = np.linalg.svd(-grads[base_name(name)], full_matrices=False)
        b, a = factors(layer)
        np.testing.assert_allclose(b @ a, (u[:, :width] * s[:width]) @ vh[:width] / (gamma * s[0]),
                                   rtol=1e-8, atol=1e-12)
        assert method.captured[name] == pytest.approx((s[:width] ** 2).sum() / (s ** 2).sum(), rel=1e-9)
    assert method.summary()["initial_spectral_norm"] == pytest.approx(2.0 / gamma)


def test_the_cut_keeps_the_truncated_svd_of_what_was_learned_at_lora_s_budget():
    method, model = built()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = None
    for step in range(2):
        model(**batch(seed=step)).loss.backward()
        opt.step()
        if step == 1:
            before = {n: (2.0 * m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().double()
                      for n, m in method.cut.layers.items()}
        if method.after_optimizer_step(step):
            method.refresh_optimizer(opt)
        opt.zero_grad()
    lora_params = 2 * sum(m.in_features + m.out_features for m in method.cut.layers.values())
    assert method.cut.cut_done and set(method.cut.ranks.values()) == {2}
    assert method.cut.param_counts["after"] == method.cut.budget == lora_params
    for n, m in method.cut.layers.items():
        after = 2.0 * m.lora_B["default"].weight @ m.lora_A["default"].weight
        u, s, vh = torch.linalg.svd(before[n], full_matrices=False)
        torch.testing.assert_close(after.double(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-9, atol=1e-12)
    assert method.matrix_columns()["specwide_rank"] == {base_name(n): 2 for n in method.cut.layers}


def test_settings_are_checked():
    cls = get("specwide")
    with pytest.raises(MethodError, match="gamma = 0.0: must be a finite number > 0"):
        cls.Settings(gamma=0.0)
    with pytest.raises(MethodError, match="batches = 0: must be an integer >= 1"):
        cls.Settings(batches=0)
    with pytest.raises(MethodError, match="must be an optimizer step >= 1, or a fraction"):
        cls.Settings(cut_at=1.5)
    with pytest.raises(UserError, match="--load-in-4bit"):
        cls(cls.Settings(), run_info(quantized=True)).check()
    with pytest.raises(MethodError, match="set method.data"):
        cls(cls.Settings(), run_info()).build(tiny_bert())


def test_trains_through_the_cli_timed_and_predicts(tmp_path, glue_dir, capsys):
    out = tmp_path / "run"
    assert main(tiny(glue_dir, out, "--method", "specwide", "--rank", "2", "--specwide-batches", "2",
                     "--specwide-cut-at", "0.5", "--epochs", "2", "--report-to", "none")) == 0
    record = json.loads((out / "result.json").read_text())
    budget, info = record["budget"], record["method_info"]
    per_rank = budget["adapter_params"] // 2
    assert budget["trained_adapter_params_initial"] == 3 * per_rank
    assert budget["trained_adapter_params_final"] <= 2 * per_rank
    assert info["width"] == 3 and info["batches"] == 2 and 0 < info["captured_mean"] <= 1
    assert 0 < record["timing"]["init_seconds"] < record["timing"]["train_seconds"]
    capsys.readouterr()
    assert main(["predict", str(out), "--output", str(tmp_path / "p.csv")]) == 0
    assert f"mcc {record['final']['mcc']:.4f}" in capsys.readouterr().err
    assert main(tiny(glue_dir, tmp_path / "bad", "--method", "specwide", "--rank", "2", "--specwide-gamma", "-1")) == 2
    assert "gamma" in error_line(capsys)
    # widecut's checks, inherited, name this method's flags
    assert main(tiny(glue_dir, tmp_path / "late", "--method", "specwide", "--rank", "2", "--specwide-cut-at", "1000")) == 2
    assert error_line(capsys).endswith("lower --specwide-cut-at")
