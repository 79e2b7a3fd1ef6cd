"""The report over any set of methods (schema-2 records): every column compared with the reference and the
rival, a bench's variants as columns, the majority-class mark, warm-up timings, parameters trained, rank
allocation, a loss as the metric. Numbers checked against hand computations."""

from __future__ import annotations

import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from report_runs import (T_975_DF2, cell, llama_matrices, make_bench, verdict_starting, write_bench,
                         write_run, write_run2)

from fwlora import cli, report


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    return make_bench(tmp_path / "quick")


def test_no_hard_coded_list_of_three_methods():
    for name in ("METHODS", "LABEL", "PAIRS"):
        assert not hasattr(report, name), name


def test_four_methods_each_compared_with_lora_and_adalora(tmp_path: Path):
    root = tmp_path / "four"
    finals = {"lora": [0.50, 0.52, 0.54], "adalora": [0.51, 0.52, 0.53], "fwlora": [0.55, 0.58, 0.59],
              "mine": [0.49, 0.50, 0.55]}
    train = {"lora": 100.0, "adalora": 112.0, "fwlora": 101.0, "mine": 130.0}
    write_bench(root, tasks=("sst2",), labels=("r2",), methods=("mine", "fwlora", "adalora", "lora"), seeds=3)
    for method, values in finals.items():
        for seed, v in enumerate(values):
            write_run2(root, "sst2", "r2", method, seed, [v - 0.1, v], train=train[method], step=train[method] / 1000)
    summary = report.write_report([root], tmp_path / "out")
    (proto,) = summary.protocols
    assert proto.columns.labels == ("lora", "adalora", "fwlora", "mine")  # registry order, the unknown method last
    (c,) = proto.cells
    lines = c.verdicts

    # mine - LoRA: -0.01, -0.02, +0.01, by hand
    d = [-0.01, -0.02, 0.01]
    half = T_975_DF2 * statistics.stdev(d) / math.sqrt(3)
    ci = c.differences[("mine", "lora")]
    assert ci.mean == pytest.approx(-0.02 / 3) and ci.low == pytest.approx(-0.02 / 3 - half)
    assert "no difference detectable at 95 % with 3 seeds" in verdict_starting(lines, "mine − LoRA: ")
    # FW-LoRA - LoRA: 0.05, 0.06, 0.05 -> lower bound 0.0533 - 0.0143 > 0
    assert "FW-LoRA better than LoRA at 95 % (3 seeds)" in verdict_starting(lines, "FW-LoRA − LoRA: ")
    assert "no difference detectable" in verdict_starting(lines, "AdaLoRA − LoRA: ")
    # against AdaLoRA: FW-LoRA 0.04, 0.06, 0.06 (better); mine -0.02, -0.02, +0.02 (no difference)
    assert "FW-LoRA better than AdaLoRA at 95 % (3 seeds)" in verdict_starting(lines, "FW-LoRA − AdaLoRA: ")
    assert c.differences[("mine", "adalora")].diffs == pytest.approx([-0.02, -0.02, 0.02])
    assert "no difference detectable at 95 % with 3 seeds" in verdict_starting(lines, "mine − AdaLoRA: ")
    # a verdict line with the time hypothesis for every method but the reference; AdaLoRA keeps ~1.12x
    fw = verdict_starting(lines, "**Verdict**: FW-LoRA vs AdaLoRA: ")
    assert "FW-LoRA time 1.010x LoRA" in fw and fw.endswith(": met")
    mine = verdict_starting(lines, "**Verdict**: mine vs AdaLoRA: ")
    assert "mine time 1.300x LoRA" in mine and mine.endswith(": not met")
    assert verdict_starting(lines, "AdaLoRA time 1.120x LoRA").endswith("hypothesis: ~1.12x): close to it")
    assert not [v for v in lines if v.startswith(("LoRA − ", "**Verdict**: LoRA", "**Verdict**: AdaLoRA"))]

    pooled = proto.pooled["sst2"].verdicts
    assert any(v.startswith("mine − AdaLoRA: ") for v in pooled)
    assert any(v.startswith("mine time 1.300x LoRA over 3 pairs") and v.endswith("not met") for v in pooled)
    header = summary.main_table.splitlines()[2]
    assert header == ("| task (metric) | budget (rank, LoRA %) | LoRA | AdaLoRA | FW-LoRA | mine | FW-LoRA time / LoRA | "
                      "mine time / LoRA | AdaLoRA time / LoRA | FW-LoRA − AdaLoRA [95 % CI] | mine − AdaLoRA [95 % CI] |")
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# LoRA vs AdaLoRA vs FW-LoRA vs mine: report")
    assert "**Verdict**: mine vs AdaLoRA" in md
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    mine_row = next(r for r in rows if r["method"] == "mine")
    assert float(mine_row["time_ratio_median"]) == pytest.approx(1.3)
    assert float(mine_row["diff_vs_reference_mean"]) == pytest.approx(-0.02 / 3)


def test_majority_class_is_flagged(tmp_path: Path):
    root = tmp_path / "majority"
    majority = {"accuracy": 0.509}
    # LoRA scores exactly the majority rate; AdaLoRA's mean 0.520 lies 0.011 above it (not flagged)
    for method, values in (("lora", [0.509, 0.509]), ("adalora", [0.515, 0.525]), ("fwlora", [0.60, 0.62])):
        for seed, v in enumerate(values):
            write_run2(root, "sst2", "r2", method, seed, [v], majority=majority)
    summary = report.write_report([root], tmp_path / "out")
    (c,) = summary.protocols[0].cells
    assert c.majority == pytest.approx(0.509)
    assert {m: s.at_majority for m, s in c.columns.items()} == {"lora": True, "adalora": False, "fwlora": False}
    row = summary.main_table.splitlines()[-1]
    assert "| 0.509 ± 0.000 (at majority class) |" in row and "| 0.520 ± 0.007 |" in row
    note = "(LoRA at the majority class: did not learn)"
    assert note in verdict_starting(c.verdicts, "AdaLoRA − LoRA: ")
    assert note in verdict_starting(c.verdicts, "FW-LoRA − LoRA: ")
    assert "majority" not in verdict_starting(c.verdicts, "FW-LoRA − AdaLoRA: ")
    with_lora = [v for v in summary.protocols[0].pooled["sst2"].verdicts if " − LoRA: " in v]
    assert len(with_lora) == 2 and all(note in v for v in with_lora)
    assert "at majority class" in (tmp_path / "out" / "report.md").read_text()


def test_majority_class_of_release1_records(tmp_path: Path):
    # release 1 recorded no majority rate: MCC's is 0 for any constant predictor; accuracy's is unknown
    root = tmp_path / "r1"
    write_run(root, "cola", "r2", "lora", 0, final=0.005)
    write_run(root, "cola", "r2", "fwlora", 0, final=0.30)
    write_run(root, "sst2", "r2", "lora", 0, final=0.50)
    (p,) = report.discover([root])
    cola, sst2 = report.summarise_protocol(p).cells
    assert cola.majority == 0.0 and cola.columns["lora"].at_majority
    assert not cola.columns["fwlora"].at_majority
    assert sst2.majority is None and not sst2.columns["lora"].at_majority


def test_variants_are_columns_of_their_own(tmp_path: Path):
    root = tmp_path / "variants"
    for seed in range(2):
        write_run2(root, "sst2", "r2", "lora", seed, [0.50 + 0.01 * seed])
        write_run2(root, "sst2", "r2", "fwlora", seed, [0.52 + 0.01 * seed])
        write_run2(root, "sst2", "r2", "fwlora", seed, [0.55 + 0.02 * seed], label="fwlora_exact", fw_measure_every=1)
    (p,) = report.discover([root])  # one protocol: the variant's runs are not repeats of FW-LoRA's
    assert sorted({r.label for r in p.runs}) == ["fwlora", "fwlora_exact", "lora"]
    s = report.summarise_protocol(p)
    assert s.columns.labels == ("lora", "fwlora", "fwlora_exact")
    assert s.columns.names == {"lora": "LoRA", "fwlora": "FW-LoRA", "fwlora_exact": "fwlora_exact"}
    assert s.columns.method_of["fwlora_exact"] == "fwlora"
    (c,) = s.cells
    assert c.columns["fwlora_exact"].final.mean == pytest.approx(0.56)
    assert c.differences[("fwlora_exact", "lora")].diffs == pytest.approx([0.05, 0.06])
    assert any(v.startswith("fwlora_exact − LoRA: ") for v in c.verdicts)
    # a variant is also paired with its own method's column: 0.55 - 0.52, 0.57 - 0.53
    assert c.differences[("fwlora_exact", "fwlora")].diffs == pytest.approx([0.03, 0.04])
    assert any(v.startswith("fwlora_exact − FW-LoRA: +0.035") for v in c.verdicts)
    assert any(v.startswith("**Verdict**: fwlora_exact vs AdaLoRA: no AdaLoRA runs") for v in c.verdicts)
    # FW-LoRA's setting concerns both of its columns, not LoRA's
    assert s.settings.per_column["fw_measure_every"] == {"fwlora": None, "fwlora_exact": 1}
    assert "| LoRA | FW-LoRA | fwlora_exact |" in report.main_table(s)
    assert "fwlora_exact − LoRA [95 % CI]" in report.main_table(s)  # no AdaLoRA: differences with the reference


def test_schema2_timing_keys_and_release1_ones(bench: Path, tmp_path: Path):
    root = tmp_path / "timing"
    for seed in range(2):
        write_run2(root, "sst2", "r2", "lora", seed, [0.5], step=0.1)
        write_run2(root, "sst2", "r2", "fwlora", seed, [0.5], step=0.1, timing={
            "warmup_step_seconds_median": 0.12 + 0.02 * seed, "after_warmup_step_seconds_median": 0.1,
            "warmup_seconds": 5.0})
        write_run2(root, "sst2", "r2", "mine", seed, [0.5], step=0.1, timing={
            "warmup_step_seconds_median": 0.2, "after_warmup_step_seconds_median": 0.09})
    (p,) = report.discover([root])
    (c,) = report.summarise_protocol(p).cells
    fw = c.columns["fwlora"]
    assert fw.warmup_step_seconds_median.mean == pytest.approx(0.13)
    assert fw.warmup_seconds.mean == pytest.approx(5.0)
    assert ("FW-LoRA median step: 0.1300 s during the Fisher warm-up, 0.1000 s after it (LoRA: 0.1000 s)"
            in c.verdicts)
    assert "mine median step: 0.2000 s during its warm-up, 0.0900 s after it (LoRA: 0.1000 s)" in c.verdicts
    # release 1's fw_* names: FW-LoRA's warm-up step at r1 is 1.3 x its median step (0.101, 0.203, 0.13)
    (p1,) = report.discover([bench])
    r1 = cell(report.summarise_protocol(p1), "r1").columns["fwlora"]
    assert r1.warmup_step_seconds_median.mean == pytest.approx(1.3 * statistics.mean([0.101, 0.203, 0.13]))
    assert r1.after_warmup_step_seconds_median.mean == pytest.approx(statistics.mean([0.101, 0.203, 0.13]))
    assert r1.warmup_seconds.mean == pytest.approx(5.0)


def test_parameters_trained_over_the_run(bench: Path, tmp_path: Path):
    root = tmp_path / "params"
    write_run2(root, "sst2", "r2", "lora", 0, [0.5], params=(200, 200, 200.0))
    write_run2(root, "sst2", "r2", "fwrank", 0, [0.5], params=(1000, 800, 912.4))
    (p,) = report.discover([root])
    summary = report.summarise_protocol(p)
    (c,) = summary.cells
    fr = c.columns["fwrank"]
    assert (fr.size.params.initial, fr.size.params.final, fr.size.params.mean) == (1000, 800, 912.4)
    assert fr.size.actual_percent == pytest.approx(100 * 912.4 / 100_000)  # the mean over steps is the budget spent
    table = report.detail_table(c, summary.columns)
    assert "| fwrank | 1/1 seed | " in table and "| 1,000 → 800 (mean 912) |" in table
    assert "| LoRA | 1/1 seed | " in table and "| 200 |" in table
    # release 1: the one trainable count (AdaLoRA at r1: 16 x 2 x 6 + 50)
    (p1,) = report.discover([bench])
    summary1 = report.summarise_protocol(p1)
    assert "| 242 |" in report.detail_table(cell(summary1, "r1"), summary1.columns)


def test_layer_kind_grid_for_any_architecture():
    grid = report.layer_kind_grid
    # MPNet and LLaMA kinds in their architecture's order whatever order they come in; unknown ones as first seen
    assert report.order_kinds(["intermediate.dense", "attention.attn.v", "custom.z", "attention.attn.q", "custom.a"]) == \
        ["attention.attn.q", "attention.attn.v", "intermediate.dense", "custom.z", "custom.a"]
    assert report.order_kinds(["mlp.down_proj", "self_attn.q_proj", "mlp.gate_proj", "self_attn.k_proj"]) == \
        ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert report.order_kinds(["b.z", "a.y"]) == ["b.z", "a.y"]
    layers, kinds, g = grid({(1, "mlp.up_proj"): 2.0, (None, "lm_head"): 3.0, (0, "self_attn.q_proj"): 1.0})
    assert layers == [0, 1, None] and kinds == ["self_attn.q_proj", "mlp.up_proj", "lm_head"]
    assert g[0, 0] == 1.0 and g[1, 1] == 2.0 and g[2, 2] == 3.0 and math.isnan(g[0, 1])


def test_rank_allocation_figure(tmp_path: Path):
    root = tmp_path / "ranks"
    write_bench(root, tasks=("sst2",), labels=("r2",), methods=("lora", "adalora", "fwrank"), seeds=2)
    for seed in range(2):
        write_run2(root, "sst2", "r2", "lora", seed, [0.5], matrices=llama_matrices("effective_rank", lambda l, j: 1.0))
        write_run2(root, "sst2", "r2", "adalora", seed, [0.5],
                   matrices=llama_matrices("adalora_rank", lambda layer, j: 2 * (j % 2)))
        fr = llama_matrices("fwrank_rank", lambda layer, j: 1 + j % 3)
        for row in fr:
            row.update(fisher=1.0 + row["layer"], importance=(1.0 + row["layer"]) / 21.0)
        write_run2(root, "sst2", "r2", "fwrank", seed, [0.5], matrices=fr)
    out = tmp_path / "out"
    summary = report.write_report([root], out)
    (proto,) = summary.protocols
    (name,) = proto.plots["ranks"]
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    md = (out / "report.md").read_text()
    assert f"![{name}]({name})" in md and "Rank allocation" in md
    ranks = proto.cells[0].matrices.ranks
    assert ranks["fwrank"].total_mean == pytest.approx(2 * (1 + 2 + 3 + 1 + 2 + 3 + 1))
    assert ranks["adalora"].zero_fraction == pytest.approx(4 / 7)  # kinds 0, 2, 4, 6 pruned to 0
    assert "fwrank's final rank pattern" in md and "AdaLoRA's final rank pattern" in md
    # no fwrank, no figure (the release-1 bench of test_report_files_plots_and_links has none either)
    assert "ranks" not in report.write_report([root / "sst2" / "r2" / "lora"], tmp_path / "o2").protocols[0].plots


def test_lower_is_better_wording(tmp_path: Path):
    root = tmp_path / "loss"
    for method, finals in (("lora", [2.0, 2.1, 2.2]), ("fwlora", [1.8, 1.85, 2.0])):
        for seed, v in enumerate(finals):  # epochs: v + 0.5, v - 0.1 (the best: the lowest), v
            write_run2(root, "alpaca", "r2", method, seed, [v + 0.5, v - 0.1, v], metric="eval_loss", higher=False)
    summary = report.write_report([root], tmp_path / "out")
    (proto,) = summary.protocols
    (c,) = proto.cells
    lora = c.columns["lora"]
    assert lora.best.mean == pytest.approx(2.0) and lora.best_epoch.mean == pytest.approx(2.0)
    # FW-LoRA - LoRA: -0.2, -0.25, -0.2: a lower loss, so FW-LoRA is the better one
    ci = c.differences[("fwlora", "lora")]
    assert ci.high < 0
    assert "FW-LoRA better than LoRA at 95 % (3 seeds)" in verdict_starting(c.verdicts, "FW-LoRA − LoRA: ")
    assert "FW-LoRA better than LoRA at 95 % (3 pairs)" in proto.pooled["alpaca"].verdicts[0]
    assert "| alpaca (eval_loss, lower is better) | r2" in summary.main_table
    assert c.majority is None and not lora.at_majority
    assert report.difference_verdict(ci, "A", "B", higher_is_better=False) == "A better than B at 95 % (3 seeds)"
    assert report.difference_verdict(ci, "A", "B") == "A worse than B at 95 % (3 seeds)"


def test_cli_reference(bench: Path, tmp_path: Path, capsys):
    assert cli.main(["report", str(bench), "--output", str(tmp_path / "o"), "--reference", "adalora"]) == 0
    printed = capsys.readouterr().out
    assert "FW-LoRA time / AdaLoRA" in printed and "LoRA time / AdaLoRA" in printed
    assert cli.main(["report", str(bench), "--output", str(tmp_path / "o"), "--reference", "nope"]) == 2
    assert "reference 'nope' is no column" in capsys.readouterr().err


def test_report_package_needs_neither_cli_nor_training():
    code = ("import sys, fwlora.report; bad = [m for m in sys.modules if m.startswith(('fwlora.cli', 'fwlora.train')) "
            "or m == 'matplotlib']; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_time_ratio_pairs_runs_of_one_machine_only(tmp_path: Path):
    """A bench resumed in another session on another machine: seed 1's column ran on boot y, LoRA's on x; seed 3's
    column started on x and was resumed on y (its seconds from both). Those pairs measure the machines and are
    left out of the ratios (a record without a boot id pairs with any, as before); the column's own mean time
    keeps every seed."""
    root = tmp_path / "machines"
    for seed, (boot, seconds, timing) in enumerate([("x", 110.0, None), ("y", 50.0, None), (None, 120.0, None),
                                                    ("y", 70.0, {"boot_ids": ["x", "y"], "resumes": 1})]):
        write_run2(root, "sst2", "r2", "lora", seed, [0.5], train=100.0, boot_id="x")
        write_run2(root, "sst2", "r2", "fwlora", seed, [0.5], train=seconds, boot_id=boot, timing=timing)
    (p,) = report.discover([root])
    (c,) = report.summarise_protocol(p).cells
    fw = c.columns["fwlora"]
    assert fw.time_ratio.n == 2 and fw.time_ratio.median == pytest.approx(1.15)
    assert fw.step_ratio.n == 2
    assert fw.train_seconds.n == 4 and fw.train_seconds.mean == pytest.approx((110 + 50 + 120 + 70) / 4)
