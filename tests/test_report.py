"""`fwlora report` on synthetic run directories whose numbers are chosen here (tests/report_runs.py), checked
against hand computations: the statistics, the whole report of one bench, reading directories."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from report_runs import (KINDS, LAYERS, RELEASE1_CONFIG, T_975_DF2, T_975_DF3, cell, config, importance_of,
                         make_bench, result, write_bench, write_failed, write_run, write_running)

from fwlora import analysis, report
from fwlora.errors import UserError
from fwlora.files import write_json


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    return make_bench(tmp_path / "quick")


# ---- pure statistics against hand computations -----------------------------------------------------


def test_paired_ci_matches_hand_computation():
    diffs = [0.01, 0.03, -0.01, 0.05]
    ci = report.paired_ci(diffs)
    mean = 0.02
    sd = math.sqrt((0.01**2 + 0.01**2 + 0.03**2 + 0.03**2) / 3)  # deviations -0.01, +0.01, -0.03, +0.03
    half = T_975_DF3 * sd / math.sqrt(4)
    assert ci.n == 4
    assert ci.mean == pytest.approx(mean)
    assert ci.sd == pytest.approx(sd)
    assert ci.t_quantile == pytest.approx(T_975_DF3, rel=1e-9)
    assert (ci.low, ci.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert report.difference_verdict(ci, "A", "B") == "no difference detectable at 95 % with 4 seeds"


def test_paired_ci_one_and_zero_pairs():
    one = report.paired_ci([0.2])
    assert one.mean == pytest.approx(0.2) and one.low is None and one.high is None
    assert "n/a" in report.fmt_ci(one) and "n/a" in report.difference_verdict(one, "A", "B")
    none = report.paired_ci([])
    assert none.n == 0 and none.mean is None
    assert report.fmt_ci(none) == "—"


def test_verdict_follows_the_interval():
    better = report.paired_ci([0.05, 0.06, 0.055])
    worse = report.paired_ci([-0.05, -0.06, -0.055])
    assert report.difference_verdict(better, "FW-LoRA", "AdaLoRA").startswith("FW-LoRA better than AdaLoRA at 95 %")
    assert report.difference_verdict(worse, "FW-LoRA", "AdaLoRA").startswith("FW-LoRA worse than AdaLoRA at 95 %")
    from fwlora import methods  # each method's claim on time is the registry's

    assert methods.time_hypothesis("fwlora").verdict(1.005) == "met"
    assert methods.time_hypothesis("fwlora").verdict(1.19) == "not met"
    assert methods.time_hypothesis("adalora").verdict(1.13) == "close to it"
    assert methods.time_hypothesis("adalora").verdict(1.40) == "slower than that"


def test_median_of_per_seed_ratios_not_ratio_of_means():
    method = {0: 12.0, 1: 22.0, 2: 30.0, 3: 50.0}
    lora = {0: 10.0, 1: 20.0, 2: 20.0}  # seed 3 has no LoRA partner: left out
    r = report.median_ratio(method, lora)
    assert r.n == 3
    assert r.median == pytest.approx(1.2)  # ratios 1.2, 1.1, 1.5; the ratio of means would be 64/50 = 1.28
    assert (r.min, r.max) == (pytest.approx(1.1), pytest.approx(1.5))


def test_mean_std_is_the_sample_std():
    s = report.mean_std([0.40, 0.42, 0.44, None])
    assert s.n == 3 and s.mean == pytest.approx(0.42)
    assert s.std == pytest.approx(math.sqrt((0.02**2 + 0 + 0.02**2) / 2))
    assert report.mean_std([0.3]).std is None


def test_analysis_helpers():
    layers, kinds, grid = analysis.layer_kind_grid({(1, "output.dense"): 2.0, (0, "attention.self.query"): 1.0,
                                                    (0, "custom"): 5.0})
    assert layers == [0, 1] and kinds == ["attention.self.query", "output.dense", "custom"]
    assert grid[0, 0] == 1.0 and grid[1, 1] == 2.0 and grid[0, 2] == 5.0 and math.isnan(grid[1, 0])
    imp = [0.1, 0.2, 0.3, 0.4]
    up = analysis.importance_shrink_correlation(imp, [1, 1, 1, 1], [0.5, 0.6, 0.7, 0.8])
    down = analysis.importance_shrink_correlation(imp, [1, 1, 1, 1], [0.8, 0.7, 0.6, 0.5])
    assert up["spearman"] == pytest.approx(1.0) and down["spearman"] == pytest.approx(-1.0) and up["n"] == 4
    assert math.isnan(analysis.importance_shrink_correlation(imp, [1, 1, 1, 1], [0.5] * 4)["spearman"])


def test_share_by_kind_and_rank_correlation_by_hand():
    shares = analysis.share_by_kind({"enc.layer.0.attention.self.query": 1.0, "enc.layer.1.attention.self.query": 2.0,
                                     "enc.layer.0.output.dense": 5.0, "enc.layer.1.output.dense": None})
    assert shares == pytest.approx({"attention.self.query": 3 / 8, "output.dense": 5 / 8})
    assert analysis.rank_correlation([1, 2, 3, None], [10, 30, 20, 0]) == pytest.approx(0.5)  # d = 0, 1, 1: 1 - 6*2/24
    assert math.isnan(analysis.rank_correlation([1, 2], [1, 2]))


# ---- the whole report on a synthetic bench ---------------------------------------------------------


def test_importance_share_beside_update_share_by_hand(bench: Path, tmp_path: Path):
    summary = report.write_report([bench], tmp_path / "out")
    q = cell(summary.protocols[0], "r1").matrices.importance_vs_update
    raw = {j: sum(importance_of(j, layer) for layer in range(LAYERS)) for j in range(len(KINDS))}
    assert q.source == "fwlora" and q.seeds == 3
    assert q.importance_share == pytest.approx({KINDS[j]: v / sum(raw.values()) for j, v in raw.items()})

    def lora_share(seed: int) -> dict[str, float]:  # LoRA's norm in matrices(): 1 + 0.1 j + 0.05 layer + 0.01 seed
        sq = {j: sum((1.0 + 0.1 * j + 0.05 * layer + 0.01 * seed) ** 2 for layer in range(LAYERS)) for j in raw}
        return {KINDS[j]: v / sum(sq.values()) for j, v in sq.items()}

    assert q.update_share["lora"] == pytest.approx(
        {k: statistics.fmean(lora_share(s)[k] for s in range(3)) for k in KINDS})
    assert q.spearman["lora"] == pytest.approx(1.0)  # both rise with the kind's index first, then the layer
    assert "where the Fisher statistic points" in (tmp_path / "out" / "report.md").read_text()


def test_pooled_over_tasks_averages_each_seed_over_tasks_then_intervals_over_seeds(tmp_path: Path):
    root = tmp_path / "two"
    write_bench(root, tasks=("cola", "sst2"), labels=("r1",), methods=("lora", "fwlora"), seeds=3)
    finals = {("cola", "lora"): [0.20, 0.22, 0.24], ("cola", "fwlora"): [0.25, 0.21, 0.30],
              ("sst2", "lora"): [0.80, 0.81, 0.82], ("sst2", "fwlora"): [0.83, 0.80, 0.81]}
    for (task, method), values in finals.items():
        for seed, v in enumerate(values):
            if (task, method, seed) != ("sst2", "fwlora", 2):  # sst2 seed 2 missing: seed 2 leaves the pool
                write_run(root, task, "r1", method, seed, final=v)
    summary = report.write_report([root], tmp_path / "out")
    across = summary.protocols[0].pooled_over_tasks
    per_seed = [((0.25 - 0.20) + (0.83 - 0.80)) / 2, ((0.21 - 0.22) + (0.80 - 0.81)) / 2]
    ci = across.differences[("fwlora", "lora")].interval
    assert across.tasks == ("cola", "sst2") and ci.seeds == (0, 1)
    assert ci.diffs == pytest.approx(per_seed) and ci.mean == pytest.approx(statistics.fmean(per_seed))
    sd = statistics.stdev(per_seed)
    assert ci.high == pytest.approx(statistics.fmean(per_seed) + 12.706204736174707 * sd / math.sqrt(2))  # t(0.975, 1)
    assert "Pooled over tasks (cola, sst2)" in (tmp_path / "out" / "report.md").read_text()


def test_report_numbers_match_hand_computations(bench: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = report.write_report([bench], out)
    (proto,) = summary.protocols
    assert proto.label == "quick (preset quick)"
    r1, r2 = cell(proto, "r1"), cell(proto, "r2")

    lora = r1.columns["lora"]
    assert lora.final.mean == pytest.approx(statistics.mean([0.40, 0.42, 0.44]))
    assert lora.final.std == pytest.approx(0.02)
    # best epoch: our epochs rise by 0.02 to the final one, so best == final here
    assert lora.best.mean == pytest.approx(0.42)
    ada = r1.columns["adalora"]
    assert (ada.seeds.complete, ada.seeds.failed, ada.seeds.expected) == (2, 1, 3)
    assert ada.seeds.text == "2/3 seeds, 1 failed"
    assert ada.final.mean == pytest.approx(0.43) and ada.final.std == pytest.approx(math.sqrt(2) * 0.02)
    # params: adapter apart from the head; actual % from the adapter's trainable parameters
    assert ada.size.adapter_params == 16 * LAYERS * len(KINDS) + 50 and ada.size.head_params == 770
    assert ada.size.actual_percent == pytest.approx(100 * (16 * LAYERS * len(KINDS) + 50) / 100_000)

    # time ratios: median of per-seed ratios (AdaLoRA r1 has seeds 0, 1 only)
    assert ada.time_ratio.median == pytest.approx(statistics.median([120 / 100, 220 / 200]))
    fw = r1.columns["fwlora"]
    assert fw.time_ratio.median == pytest.approx(statistics.median([110 / 100, 202 / 200, 150 / 100]))
    assert fw.step_ratio.median == pytest.approx(statistics.median([0.101 / 0.10, 0.203 / 0.20, 0.13 / 0.10]))

    # paired differences, FW-LoRA - LoRA at r1: 0.03, 0.02, 0.03
    d = [0.03, 0.02, 0.03]
    sd = statistics.stdev(d)
    ci = r1.differences[("fwlora", "lora")]
    assert ci.mean == pytest.approx(statistics.mean(d))
    assert ci.low == pytest.approx(statistics.mean(d) - T_975_DF2 * sd / math.sqrt(3))
    assert ci.high == pytest.approx(statistics.mean(d) + T_975_DF2 * sd / math.sqrt(3))
    assert ci.low > 0  # -> "better"
    assert any(v.startswith("FW-LoRA − LoRA") and "FW-LoRA better than LoRA at 95 % (3 seeds)" in v for v in r1.verdicts)
    # FW-LoRA - AdaLoRA at r1 pairs seeds 0, 1 only: 0.02, -0.01
    ci = r1.differences[("fwlora", "adalora")]
    assert ci.seeds == (0, 1) and ci.mean == pytest.approx(0.005)
    # r2: FW-LoRA seed 2 is still running
    assert r2.columns["fwlora"].seeds.text == "2/3 seeds, 1 running"
    assert r2.differences[("fwlora", "adalora")].diffs == pytest.approx([0.01, 0.05])

    # pooled over budgets: pairs = budget x seed
    pooled = proto.pooled["cola"].differences[("fwlora", "lora")].interval
    all_d = [0.03, 0.02, 0.03, 0.03, 0.03]
    assert pooled.n == 5 and pooled.mean == pytest.approx(statistics.mean(all_d))

    # the main table shows every method, the marks and the CI
    table = summary.main_table
    assert "2/3 seeds, 1 failed" in table and "2/3 seeds, 1 running" in table
    assert "0.420 ± 0.020" in table
    r1_row = next(line for line in table.splitlines() if line.startswith("| cola (mcc) | r1"))
    assert "1.10x (step" in r1_row  # FW-LoRA: median(1.1, 1.01, 1.5), not the mean 1.2 nor seed 2's 1.5
    assert "1.15x (step" in r1_row  # AdaLoRA: median(1.2, 1.1) over its two complete seeds


def test_report_files_plots_and_links(bench: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = report.write_report([bench], out)
    md = (out / "report.md").read_text()
    assert summary.report == out / "report.md"
    plots = summary.protocols[0].plots
    assert set(plots) == {"metric_vs_budget", "time_ratios", "importance", "matrices", "curves"}
    for names in plots.values():
        for name in names:
            data = (out / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
            assert f"]({name})" in md  # linked from report.md
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    for text in ("Command: `fwlora bench", "preset quick", "Reduced protocol", "model = minilm",
                 "abc123", "Pooled over budgets", "reallocation or uniform decay?", "**Verdict**: FW-LoRA vs AdaLoRA",
                 "hypothesis: ~1.01x", "RuntimeError: boom"):
        assert text in md, text
    saved = json.loads((out / "summary.json").read_text())
    assert saved["protocols"][0]["cells"][0]["methods"]["lora"]["final"]["mean"] == pytest.approx(0.42)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 6  # 2 budgets x 3 methods
    row = next(r for r in rows if r["budget_label"] == "r1" and r["method"] == "adalora")
    assert (row["seeds_complete"], row["failed"], row["seeds_expected"]) == ("2", "1", "3")
    assert float(row["final_mean"]) == pytest.approx(0.43)


def penalty_question(p: report.Protocol, budget: str):
    """FW-LoRA's own report numbers (its section, from methods/fwlora) in one cell."""
    from fwlora.methods.fwlora.report_section import penalty_question

    view = report.report_view(p)
    return penalty_question(next(c for c in view.cells if c.budget_label == budget), view, "fwlora")


def test_open_question_numbers(bench: Path):
    (p,) = report.discover([bench])
    q = penalty_question(p, "r1")
    # I_m is the same in every seed: its spread equals the hand-normalised one
    raw = [importance_of(j, layer) for layer in range(LAYERS) for j in range(len(KINDS))]
    imp = [v / sum(raw) for v in raw]
    assert q.importance.min == pytest.approx(min(imp)) and q.importance.max == pytest.approx(max(imp))
    assert q.importance.uniform == pytest.approx(1 / len(imp))
    assert q.weights.relative_range == pytest.approx(analysis.uniformity_of_weights(imp)["relative_range"])
    # FW-LoRA's norms are LoRA's times (0.5 + 5 I): shrinkage grows as I falls
    fw = q.shift
    assert fw.pairs == 3
    expected_log = statistics.fmean(math.log(0.5 + 5 * i) for i in imp)
    assert fw.mean_log_ratio == pytest.approx(expected_log)
    assert fw.importance_spearman == pytest.approx(1.0)
    ranks = cell(report.summarise_protocol(p), "r1").matrices.ranks
    assert ranks["adalora"].zero_fraction == pytest.approx(2 / 6)  # ranks j % 4 over six kinds: 0,1,2,3,0,1


def test_uniform_shrinkage_is_reported_as_such(tmp_path: Path):
    root = tmp_path / "uniform"
    write_bench(root, labels=("r2",), methods=("lora", "fwlora"), seeds=2)
    for seed in range(2):
        for m in ("lora", "fwlora"):
            write_run(root, "cola", "r2", m, seed, final=0.5, shrink_low=False)
    (p,) = report.discover([root])
    fw = penalty_question(p, "r2").shift
    assert fw.mean_log_ratio == pytest.approx(math.log(0.5))
    assert fw.std_log_ratio == pytest.approx(0.0, abs=1e-12)
    assert fw.spearman == pytest.approx(1.0)
    # a constant ratio carries no ordering: no correlation, per seed or on average
    assert all(math.isnan(r.importance_spearman) for r in fw.by_seed) and fw.importance_spearman is None


def test_verdict_changes_with_the_numbers(tmp_path: Path):
    def verdict(fw_finals: list[float], fw_train: float) -> str:
        root = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        write_bench(root, labels=("r2",), seeds=3)
        for seed in range(3):
            write_run(root, "cola", "r2", "lora", seed, final=0.50, train=100.0)
            write_run(root, "cola", "r2", "adalora", seed, final=[0.50, 0.52, 0.48][seed], train=112.0)
            write_run(root, "cola", "r2", "fwlora", seed, final=fw_finals[seed], train=fw_train)
        (p,) = report.discover([root])
        return next(v for v in report.summarise_protocol(p).cells[0].verdicts if v.startswith("**Verdict**"))

    clear = verdict([0.60, 0.62, 0.58], 100.5)  # +0.10 on every seed, 1.005x
    mixed = verdict([0.55, 0.47, 0.50], 119.0)  # +0.05, -0.05, +0.02, 1.19x
    assert "FW-LoRA better than AdaLoRA at 95 % (3 seeds)" in clear and clear.endswith(": met")
    assert "no difference detectable at 95 % with 3 seeds" in mixed and mixed.endswith(": not met")
    assert "FW-LoRA time 1.190x LoRA" in mixed


# ---- reading directories: partial, failed, missing, protocols --------------------------------------


def test_unfinished_and_missing_runs_are_marked(tmp_path: Path):
    root = tmp_path / "partial"
    write_bench(root, labels=("r2",), methods=("lora", "fwlora"), seeds=3)
    write_run(root, "cola", "r2", "lora", 0, final=0.5)
    write_running(root, "cola", "r2", "lora", 1)  # config.json only: never read as a result
    run = root / "cola" / "r2" / "lora" / "seed2"  # stopped by a signal: result.json says so, with no numbers
    write_json(run / "result.json", {"status": "interrupted", "step": 3, "config": config("cola", "lora", 2, 2, run)})
    (root / "cola" / "r2" / "fwlora" / "seed0").mkdir(parents=True)  # an empty directory: nothing to read
    (p,) = report.discover([root])
    s = report.summarise_protocol(p)
    lora, fw = s.cells[0].columns["lora"], s.cells[0].columns["fwlora"]
    assert lora.seeds.text == "1/3 seeds, 1 running, 1 interrupted"
    assert lora.final.mean == pytest.approx(0.5) and lora.final.n == 1
    assert fw.seeds.text == "0/3 seeds, 3 missing"
    assert "— (0/3 seeds, 3 missing)" in report.main_table(s)


def test_no_complete_run_is_a_user_error(tmp_path: Path):
    root = tmp_path / "nothing"
    write_running(root, "cola", "r2", "lora", 0)
    write_failed(root, "cola", "r2", "lora", 1)
    with pytest.raises(UserError, match="no complete run.*1 failed, 1 running"):
        report.write_report([root], tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        report.write_report([tmp_path / "absent"], tmp_path / "out")


def test_two_bench_directories_are_two_protocols(tmp_path: Path):
    parent = tmp_path / "runs"
    for name, lr in (("shared_lr", 2e-4), ("tuned", 1e-3)):
        write_bench(parent / name, labels=("r2",), methods=("lora", "adalora"), seeds=1, preset="command line")
        write_run(parent / name, "cola", "r2", "lora", 0, final=0.5, lr=2e-4)
        write_run(parent / name, "cola", "r2", "adalora", 0, final=0.6, lr=lr)
    summary = report.write_report([parent], tmp_path / "out")
    labels = [p.label for p in summary.protocols]
    assert labels == ["shared_lr", "tuned"]
    tuned = summary.protocols[1]
    assert tuned.settings.per_column["lr"] == {"lora": 2e-4, "adalora": 1e-3}
    assert "shared_lr" in summary.main_table and "tuned" in summary.main_table
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**lr differs between methods**: LoRA 0.0002, AdaLoRA 0.001" in md


def test_loose_runs_with_repeats_are_split_by_setting(tmp_path: Path):
    root = tmp_path / "explore"
    for name, method, lr, final in (("a", "lora", 1e-3, 0.3), ("b", "lora", 2e-4, 0.2), ("c", "adalora", 1e-3, 0.35),
                                    ("d", "fwlora", 1e-3, 0.32)):
        run = root / name
        write_json(run / "result.json", result("cola", method, 0, 2, run, final=final, lr=lr))
    (run := root / "e").mkdir()
    write_json(run / "result.json", result("cola", "fwlora", 0, 2, run, final=0.4, lr=1e-3, lambda_fw=5e-4))
    protocols = report.discover([root])
    by_label = {p.label: sorted((r.method, r.config["lr"], r.config["lambda_fw"]) for r in p.runs) for p in protocols}
    # lambda_fw does not concern LoRA or AdaLoRA: their runs join both FW-LoRA variants
    assert by_label == {
        "explore: lambda_fw=0.0001, lr=0.001": [("adalora", 1e-3, 1e-4), ("fwlora", 1e-3, 1e-4), ("lora", 1e-3, 1e-4)],
        "explore: lambda_fw=0.0005, lr=0.001": [("adalora", 1e-3, 1e-4), ("fwlora", 1e-3, 5e-4), ("lora", 1e-3, 1e-4)],
        "explore: lr=0.0002": [("lora", 2e-4, 1e-4)],
    }
    for p in protocols:  # the budget label comes from the config when the path has none
        assert {r.budget_label for r in p.runs} == {"r2"}


def test_reduced_protocol_lists_differences():
    ref = {**RELEASE1_CONFIG, "model": "roberta-base"}
    assert report.reduced_protocol([ref]) == []
    small = {**ref, "epochs": 1, "train_limit": 500, "lr": 1e-3, "batch_size": 16, "warmup_ratio": 0.1, "model": "minilm"}
    notes = report.reduced_protocol([small, ref])
    assert {n.split(" =")[0] for n in notes} == {"epochs", "train_limit", "lr", "batch_size", "warmup_ratio", "model"}
    assert "epochs = 1 (1 run) (the seed: 3)" in notes
