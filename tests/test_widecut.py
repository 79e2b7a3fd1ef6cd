"""widecut: LoRA trained wide, cut once to LoRA's budget, checked against torch.linalg.svd of the materialised
update, hand-computed greedy allocations, the mean-parameter bound against AdaLoRA, and a save / load across
the cut."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, lora, tiny_bert
from test_cli import error_line, tiny

from fwlora import WideCut, WideCutConfig, refresh_optimizer
from fwlora.cli import main
from fwlora.errors import MethodError


def train_wide(rule: str, steps: int = 4, cut_at=3, width: int = 3, **kw):
    torch.manual_seed(0)
    model = lora(tiny_bert(), r=width, alpha=2.0 * width)
    cut = WideCut(model, WideCutConfig(target_rank=2, cut_at=cut_at, rule=rule, **kw), total_steps=steps + 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    before = None
    for step in range(steps):
        model(**batch(seed=step)).loss.backward()
        opt.step()
        if step == cut.config.cut_at - 1:
            before = {n: (float(m.scaling["default"]) * m.lora_B["default"].weight @ m.lora_A["default"].weight).detach()
                      for n, m in cut.layers.items()}
        if cut.step():
            refresh_optimizer(opt, model)
        opt.zero_grad()
    return model, cut, before


def test_uniform_cuts_every_matrix_to_its_truncated_svd():
    model, cut, _ = train_wide("uniform")  # one step trained after the cut
    assert cut.cut_done and set(cut.ranks.values()) == {2} and cut.param_counts["after"] == cut.budget
    assert all(m.lora_A["default"].weight.shape[0] == 2 for m in cut.layers.values())
    model, cut, before = train_wide("uniform", steps=3, cut_at=3)  # the cut after the last step: compare it exactly
    for n, m in cut.layers.items():
        after = float(m.scaling["default"]) * m.lora_B["default"].weight @ m.lora_A["default"].weight
        u, s, vh = torch.linalg.svd(before[n], full_matrices=False)
        torch.testing.assert_close(after, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-9, atol=1e-12)


def test_update_rule_is_the_greedy_on_learned_singular_values_per_parameter():
    model, cut, before = train_wide("update", steps=3, cut_at=3)
    spectra = {n: (torch.linalg.svdvals(before[n])[:3] ** 2).tolist() for n in before}
    assert cut.spectra.keys() == spectra.keys()
    assert all(cut.spectra[n] == pytest.approx(spectra[n], rel=1e-9) for n in spectra)
    cost = {n: sum(cut.dims[n]) for n in before}
    grants = sorted(((-v / cost[n], n, k) for n, s in spectra.items() for k, v in enumerate(s)))
    ranks, left = {n: 0 for n in spectra}, cut.budget  # by hand: best gain per parameter first, while it fits
    for _, n, k in grants:
        if ranks[n] == k and cost[n] <= left:
            ranks[n], left = ranks[n] + 1, left - cost[n]
    assert cut.ranks == ranks and sum(r * cost[n] for n, r in ranks.items()) <= cut.budget
    assert len(set(ranks.values())) > 1  # not the uniform allocation


def test_energy_rule_uses_the_cut_step_s_inputs():
    _, cut, _ = train_wide("energy", steps=3, cut_at=3)
    assert cut.spectra and all(len(v) == 3 and all(x >= 0 for x in v) for v in cut.spectra.values())
    assert sum(r * sum(cut.dims[n]) for n, r in cut.ranks.items()) <= cut.budget


def test_state_across_the_cut(tmp_path):
    model, cut, _ = train_wide("update", steps=4, cut_at=2)
    cut.save(tmp_path)
    torch.manual_seed(0)
    fresh = lora(tiny_bert(), r=3, alpha=6.0)
    again = WideCut(fresh, WideCutConfig(target_rank=2, cut_at=2, rule="update"))
    again.load(tmp_path)  # past the cut: the fresh model takes the saved shapes
    shapes = {n: tuple(p.shape) for n, p in fresh.named_parameters() if "lora_" in n}
    assert shapes == {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    assert again.ranks == cut.ranks and again.cut_done and not again.step()


def test_a_cut_the_run_never_reaches_and_a_width_beyond_adalora_s_mean_are_refused(tmp_path, glue_dir, capsys):
    with pytest.raises(MethodError, match="the cut would never happen"):
        WideCut(lora(tiny_bert(), r=3), WideCutConfig(target_rank=2, cut_at=10), total_steps=10)
    with pytest.raises(MethodError, match="must be an optimizer step >= 1, or a fraction"):
        WideCutConfig(cut_at=1.5)
    out = tmp_path / "wide"
    assert main(tiny(glue_dir, out, "--method", "widecut", "--rank", "2", "--widecut-width", "6",
                     "--widecut-cut-at", "0.5", "--epochs", "2")) == 2
    assert "trains 4.00 ranks on average, more than AdaLoRA's 3" in error_line(capsys)


def test_widecut_trains_through_the_cli_and_records_its_parameters(tmp_path, glue_dir):
    out = tmp_path / "run"
    assert main(tiny(glue_dir, out, "--method", "widecut", "--rank", "2", "--widecut-width", "4",
                     "--widecut-cut-at", "0.5", "--widecut-rule", "update", "--epochs", "2", "--report-to", "none")) == 0
    record = json.loads((out / "result.json").read_text())
    budget = record["budget"]
    per_rank = budget["adapter_params"] // 2
    assert budget["trained_adapter_params_initial"] == 4 * per_rank
    assert budget["trained_adapter_params_final"] <= 2 * per_rank  # the budget after the cut
    assert budget["trained_adapter_params_mean"] <= 3 * per_rank + 1e-6  # no more than AdaLoRA's init_r on average
    assert record["method_info"]["cut_at"] == 2 and record["method_info"]["width"] == 4
    assert {m["name"] for m in record["matrices"] if "widecut_rank" in m}


def test_uniform_keeps_lora_s_rank_above_r_max():
    """r_max bounds the greedy rules only: a uniform cut at rank 2 with r_max 1 still keeps rank 2 everywhere
    (LoRA's budget), where capping it would silently halve the adapter."""
    model, cut, _ = train_wide("uniform", steps=3, cut_at=3, r_max=1)
    assert set(cut.ranks.values()) == {2} and cut.param_counts["after"] == cut.budget
