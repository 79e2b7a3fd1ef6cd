"""`fwlora report` on synthetic run directories whose numbers are chosen here, checked against hand
computations (no training, no network)."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from fwlora import analysis, cli, report
from fwlora.errors import UserError
from fwlora.files import write_json
from fwlora.records import RunRecord, Status, write_config, write_result

LAYERS = 2
KINDS = analysis.KIND_ORDER
T_975_DF3 = 3.182446305284263  # Student t, 97.5 % quantile, 3 degrees of freedom (printed tables: 3.182)
T_975_DF2 = 4.302652729911275  # ... 2 degrees of freedom (tables: 4.303)


# ---- synthetic runs --------------------------------------------------------------------------------


def importance_of(j: int, layer: int) -> float:
    """Unnormalised importance: rises with the matrix kind's index (so it is not uniform)."""
    return 1.0 + 3.0 * j + layer


def matrices(method: str, seed: int, shrink_low: bool = True) -> list[dict]:
    raw = {(layer, j): importance_of(j, layer) for layer in range(LAYERS) for j in range(len(KINDS))}
    total = sum(raw.values())
    rows = []
    for (layer, j), v in raw.items():
        imp = v / total
        norm = 1.0 + 0.1 * j + 0.05 * layer + 0.01 * seed  # LoRA's
        if method == "fwlora":
            norm *= (0.5 + 5 * imp) if shrink_low else 0.5  # shrinks the low-importance matrices more
        row = {"name": f"encoder.layer.{layer}.{KINDS[j]}", "layer": layer, "kind": KINDS[j], "shape": [8, 8],
               "fro_norm": norm, "effective_rank": 1.5 + 0.05 * j, "numerical_rank": 2,
               "singular_values": [0.8 * norm, 0.6 * norm]}
        if method == "fwlora":
            row.update(fisher=v * 1e-4, importance=imp)
        if method == "adalora":
            row["adalora_rank"] = j % 4
        rows.append(row)
    return rows


# Release 1's TrainConfig.to_dict() with its defaults: every run's config held every method's settings
# (the reader must not need today's TrainConfig to read yesterday's runs).
RELEASE1_CONFIG = {
    "task": "cola", "method": "lora", "model": "minilm", "head": "auto", "budget": None, "rank": None,
    "target_modules": None, "data_dir": None, "train_limit": None, "eval_limit": None, "max_length": 128, "epochs": 3,
    "lr": 2e-4, "batch_size": 32, "grad_accum": 1, "weight_decay": 0.0, "warmup_ratio": 0.06, "max_grad_norm": 1.0,
    "seed": 0, "lora_alpha": None, "lora_dropout": 0.0, "lambda_fw": 1e-4, "fw_warmup_steps": 500, "fw_beta": 0.98,
    "fw_estimator": "exact", "fw_sketch_size": 8, "fw_measure_every": 1, "fw_normalization": "sum",
    "allow_late_penalty": False, "adalora_alpha": None, "adalora_orth_reg": 0.1, "adalora_tinit": 0.12,
    "adalora_tfinal": 0.48, "adalora_delta": 0.0015, "adalora_beta1": 0.85, "adalora_beta2": 0.85,
    "mixed_precision": "no", "eval_batch_size": 128, "threads": None, "output_dir": "runs/train", "log_every": 10,
}


def config(task: str, method: str, seed: int, rank: int, out: Path, **overrides) -> dict:
    unknown = set(overrides) - set(RELEASE1_CONFIG)
    assert not unknown, unknown
    return {**RELEASE1_CONFIG, "task": task, "method": method, "seed": seed, "rank": rank, "output_dir": str(out),
            **overrides}


def result(task: str, method: str, seed: int, rank: int, out: Path, final: float, train: float = 100.0,
           step: float = 0.1, best: float | None = None, shrink_low: bool = True, **overrides) -> dict:
    metric = "mcc" if task == "cola" else "accuracy"
    cfg = config(task, method, seed, rank, out, **overrides)
    n = cfg["epochs"]
    epochs = []
    for e in range(1, n + 1):
        value = final - 0.02 * (n - e)
        if best is not None and e == max(1, n - 1):
            value = best
        epochs.append({"epoch": e, "step": 10 * e, "loss": 0.5, "accuracy": value, "mcc": value,
                       "train_seconds": train * e / n})
    timing = {"train_seconds": train, "eval_seconds": 1.0, "optimizer_steps": 10 * n, "examples_per_second": 10.0,
              "step_seconds_median": step, "peak_memory": {"kind": "process_peak_rss", "bytes": 1}, "load_seconds": 1.0}
    if method == "fwlora":
        timing.update(fw_warmup_step_seconds_median=step * 1.3, fw_after_warmup_step_seconds_median=step,
                      fw_warmup_seconds=5.0)
    adalora = None
    if method == "adalora":
        adalora = {"init_r": math.ceil(1.5 * rank), "target_r": rank, "lora_alpha": 4.0 * math.ceil(1.5 * rank),
                   "total_step": 10 * n, "tinit": 1, "tfinal": 5, "deltaT": 1, "orth_reg_weight": 0.1,
                   "beta1": 0.85, "beta2": 0.85, "final_total_rank": rank * LAYERS * len(KINDS)}
    per_rank = 16 * LAYERS * len(KINDS)
    return {
        "status": "complete", "task": task, "method": method, "seed": seed, "metric": metric,
        "final": epochs[-1], "best": max(epochs, key=lambda h: h[metric]), "epochs": epochs,
        "budget": {"rank": rank, "adapter_params": rank * per_rank, "backbone_params": 100_000, "head_params": 770,
                   "percent": 100.0 * rank * per_rank / 100_000, "requested_percent": None,
                   "trainable_params": rank * per_rank + 770 + (50 if method == "adalora" else 0),
                   "adapter_trainable_params": rank * per_rank + (50 if method == "adalora" else 0),
                   "head": "mean", "lora_alpha": 2.0 * rank, "targets": list(KINDS)},
        "adalora": adalora, "timing": timing, "matrices": matrices(method, seed, shrink_low),
        "data": {"source": "synthetic", "train_examples": 100, "eval_examples": 50, "steps_per_epoch": 10,
                 "total_steps": 10 * n},
        "notes": [], "env": {"python": "3.11", "platform": "test", "packages": {"fwlora": "0.1.0", "torch": "2.x"},
                             "git_commit": "abc123", "git_dirty": False, "torch_threads": 1, "cuda_device": None,
                             "command": "fwlora train ..."},
        "config": cfg,
    }


def write_run(bench: Path, task: str, label: str, method: str, seed: int, **kw) -> Path:
    run = bench / task / label / method / f"seed{seed}"
    rank = int(label[1:])
    write_json(run / "config.json", {"config": config(task, method, seed, rank, run,
                                                      **{k: v for k, v in kw.items() if k in RELEASE1_CONFIG}),
                                     "env": {}})
    write_json(run / "result.json", result(task, method, seed, rank, run, **kw))
    return run


def write_failed(bench: Path, task: str, label: str, method: str, seed: int) -> Path:
    run = bench / task / label / method / f"seed{seed}"
    write_json(run / "result.json", {"status": "failed", "error": "RuntimeError: boom", "task": task, "method": method,
                                     "seed": seed, "config": config(task, method, seed, int(label[1:]), run)})
    return run


def write_running(bench: Path, task: str, label: str, method: str, seed: int) -> Path:
    run = bench / task / label / method / f"seed{seed}"
    write_json(run / "config.json", {"config": config(task, method, seed, int(label[1:]), run), "env": {}})
    return run


def write_bench(bench: Path, tasks=("cola",), labels=("r1", "r2"), methods=("lora", "adalora", "fwlora"), seeds=3,
                preset: str = "preset quick") -> None:
    runs = [f"{t}/{lb}/{m}/seed{s}" for s in range(seeds) for t in tasks for lb in labels for m in methods]
    write_json(bench / "bench.json", {"command": f"fwlora bench --output-dir {bench}", "preset": {"source": preset},
                                      "set": {"epochs": 3}, "runs": runs})


# Final metrics chosen by hand: {(label, method): [seed0, seed1, seed2]}
FINAL = {
    ("r1", "lora"): [0.40, 0.42, 0.44],
    ("r1", "adalora"): [0.41, 0.45, None],  # seed 2 failed
    ("r1", "fwlora"): [0.43, 0.44, 0.47],
    ("r2", "lora"): [0.50, 0.52, 0.51],
    ("r2", "adalora"): [0.52, 0.50, 0.55],
    ("r2", "fwlora"): [0.53, 0.55, "running"],
}
TRAIN = {"lora": [100.0, 200.0, 100.0], "adalora": [120.0, 220.0, 115.0], "fwlora": [110.0, 202.0, 150.0]}
STEP = {"lora": [0.10, 0.20, 0.10], "adalora": [0.112, 0.224, 0.11], "fwlora": [0.101, 0.203, 0.13]}


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    root = tmp_path / "quick"
    write_bench(root)
    for (label, method), values in FINAL.items():
        for seed, v in enumerate(values):
            if v is None:
                write_failed(root, "cola", label, method, seed)
            elif v == "running":
                write_running(root, "cola", label, method, seed)
            else:
                write_run(root, "cola", label, method, seed, final=v, train=TRAIN[method][seed], step=STEP[method][seed])
    return root


def cell(summary: dict, label: str) -> dict:
    return next(c for c in summary["cells"] if c["budget_label"] == label)


# ---- pure statistics against hand computations -----------------------------------------------------


def test_paired_ci_matches_hand_computation():
    diffs = [0.01, 0.03, -0.01, 0.05]
    ci = report.paired_ci(diffs)
    mean = 0.02
    sd = math.sqrt((0.01**2 + 0.01**2 + 0.03**2 + 0.03**2) / 3)  # deviations -0.01, +0.01, -0.03, +0.03
    half = T_975_DF3 * sd / math.sqrt(4)
    assert ci["n"] == 4
    assert ci["mean"] == pytest.approx(mean)
    assert ci["sd"] == pytest.approx(sd)
    assert ci["t_quantile"] == pytest.approx(T_975_DF3, rel=1e-9)
    assert (ci["low"], ci["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert report.difference_verdict(ci, "A", "B") == "no difference detectable at 95 % with 4 seeds"


def test_paired_ci_one_and_zero_pairs():
    one = report.paired_ci([0.2])
    assert one["mean"] == pytest.approx(0.2) and one["low"] is None and one["high"] is None
    assert "n/a" in report.fmt_ci(one) and "n/a" in report.difference_verdict(one, "A", "B")
    none = report.paired_ci([])
    assert none["n"] == 0 and none["mean"] is None
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
    assert r["n"] == 3
    assert r["median"] == pytest.approx(1.2)  # ratios 1.2, 1.1, 1.5; the ratio of means would be 64/50 = 1.28
    assert (r["min"], r["max"]) == (pytest.approx(1.1), pytest.approx(1.5))


def test_mean_std_is_the_sample_std():
    s = report.mean_std([0.40, 0.42, 0.44, None])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.42)
    assert s["std"] == pytest.approx(math.sqrt((0.02**2 + 0 + 0.02**2) / 2))
    assert report.mean_std([0.3])["std"] is None


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
    q = cell(summary["protocols"][0], "r1")["matrices"]["importance_vs_update"]
    raw = {j: sum(importance_of(j, layer) for layer in range(LAYERS)) for j in range(len(KINDS))}
    assert q["source"] == "fwlora" and q["seeds"] == 3
    assert q["importance_share"] == pytest.approx({KINDS[j]: v / sum(raw.values()) for j, v in raw.items()})

    def lora_share(seed: int) -> dict[str, float]:  # LoRA's norm in matrices(): 1 + 0.1 j + 0.05 layer + 0.01 seed
        sq = {j: sum((1.0 + 0.1 * j + 0.05 * layer + 0.01 * seed) ** 2 for layer in range(LAYERS)) for j in raw}
        return {KINDS[j]: v / sum(sq.values()) for j, v in sq.items()}

    assert q["update_share"]["lora"] == pytest.approx(
        {k: statistics.fmean(lora_share(s)[k] for s in range(3)) for k in KINDS})
    assert q["spearman"]["lora"] == pytest.approx(1.0)  # both rise with the kind's index first, then the layer
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
    across = summary["protocols"][0]["pooled_over_tasks"]
    per_seed = [((0.25 - 0.20) + (0.83 - 0.80)) / 2, ((0.21 - 0.22) + (0.80 - 0.81)) / 2]
    ci = across["fwlora-lora"]
    assert across["tasks"] == ["cola", "sst2"] and ci["seeds"] == [0, 1]
    assert ci["diffs"] == pytest.approx(per_seed) and ci["mean"] == pytest.approx(statistics.fmean(per_seed))
    sd = statistics.stdev(per_seed)
    assert ci["high"] == pytest.approx(statistics.fmean(per_seed) + 12.706204736174707 * sd / math.sqrt(2))  # t(0.975, 1)
    assert "Pooled over tasks (cola, sst2)" in (tmp_path / "out" / "report.md").read_text()


def test_report_numbers_match_hand_computations(bench: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = report.write_report([bench], out)
    (proto,) = summary["protocols"]
    assert proto["label"] == "quick (preset quick)"
    r1, r2 = cell(proto, "r1"), cell(proto, "r2")

    lora = r1["methods"]["lora"]
    assert lora["final"]["mean"] == pytest.approx(statistics.mean([0.40, 0.42, 0.44]))
    assert lora["final"]["std"] == pytest.approx(0.02)
    # best epoch: our epochs rise by 0.02 to the final one, so best == final here
    assert lora["best"]["mean"] == pytest.approx(0.42)
    ada = r1["methods"]["adalora"]
    assert (ada["complete"], ada["failed"], ada["expected"]) == (2, 1, 3)
    assert ada["seeds_text"] == "2/3 seeds, 1 failed"
    assert ada["final"]["mean"] == pytest.approx(0.43) and ada["final"]["std"] == pytest.approx(math.sqrt(2) * 0.02)
    # params: adapter apart from the head; actual % from the adapter's trainable parameters
    assert ada["adapter_params"] == 16 * LAYERS * len(KINDS) + 50 and ada["head_params"] == 770
    assert ada["actual_percent"] == pytest.approx(100 * (16 * LAYERS * len(KINDS) + 50) / 100_000)

    # time ratios: median of per-seed ratios (AdaLoRA r1 has seeds 0, 1 only)
    assert ada["time_ratio"]["median"] == pytest.approx(statistics.median([120 / 100, 220 / 200]))
    fw = r1["methods"]["fwlora"]
    assert fw["time_ratio"]["median"] == pytest.approx(statistics.median([110 / 100, 202 / 200, 150 / 100]))
    assert fw["step_ratio"]["median"] == pytest.approx(statistics.median([0.101 / 0.10, 0.203 / 0.20, 0.13 / 0.10]))

    # paired differences, FW-LoRA - LoRA at r1: 0.03, 0.02, 0.03
    d = [0.03, 0.02, 0.03]
    sd = statistics.stdev(d)
    ci = r1["pairs"]["fwlora-lora"]
    assert ci["mean"] == pytest.approx(statistics.mean(d))
    assert ci["low"] == pytest.approx(statistics.mean(d) - T_975_DF2 * sd / math.sqrt(3))
    assert ci["high"] == pytest.approx(statistics.mean(d) + T_975_DF2 * sd / math.sqrt(3))
    assert ci["low"] > 0  # -> "better"
    assert any(v.startswith("FW-LoRA − LoRA") and "FW-LoRA better than LoRA at 95 % (3 seeds)" in v for v in r1["verdicts"])
    # FW-LoRA - AdaLoRA at r1 pairs seeds 0, 1 only: 0.02, -0.01
    ci = r1["pairs"]["fwlora-adalora"]
    assert ci["seeds"] == [0, 1] and ci["mean"] == pytest.approx(0.005)
    # r2: FW-LoRA seed 2 is still running
    assert r2["methods"]["fwlora"]["seeds_text"] == "2/3 seeds, 1 running"
    assert r2["pairs"]["fwlora-adalora"]["diffs"] == pytest.approx([0.01, 0.05])

    # pooled over budgets: pairs = budget x seed
    pooled = proto["pooled"]["cola"]["fwlora-lora"]
    all_d = [0.03, 0.02, 0.03, 0.03, 0.03]
    assert pooled["n"] == 5 and pooled["mean"] == pytest.approx(statistics.mean(all_d))

    # the main table shows every method, the marks and the CI
    table = summary["main_table"]
    assert "2/3 seeds, 1 failed" in table and "2/3 seeds, 1 running" in table
    assert "0.420 ± 0.020" in table
    r1_row = next(line for line in table.splitlines() if line.startswith("| cola (mcc) | r1"))
    assert "1.10x (step" in r1_row  # FW-LoRA: median(1.1, 1.01, 1.5), not the mean 1.2 nor seed 2's 1.5
    assert "1.15x (step" in r1_row  # AdaLoRA: median(1.2, 1.1) over its two complete seeds


def test_report_files_plots_and_links(bench: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = report.write_report([bench], out)
    md = (out / "report.md").read_text()
    assert summary["report"] == str(out / "report.md")
    plots = summary["protocols"][0]["plots"]
    assert set(plots) == {"metric_vs_budget", "time_ratios", "importance", "matrices", "curves"}
    for names in plots.values():
        for name in names:
            data = (out / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
            assert f"]({name})" in md  # linked from report.md
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    for text in ("Command: `fwlora bench", "preset quick", "Reduced protocol", "model = minilm",
                 "abc123", "Pooled over budgets", "Open question 1", "**Verdict**: FW-LoRA vs AdaLoRA",
                 "hypothesis: ~1.01x", "RuntimeError: boom"):
        assert text in md, text
    saved = json.loads((out / "summary.json").read_text())
    assert saved["protocols"][0]["cells"][0]["methods"]["lora"]["final"]["mean"] == pytest.approx(0.42)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 6  # 2 budgets x 3 methods
    row = next(r for r in rows if r["budget_label"] == "r1" and r["method"] == "adalora")
    assert (row["seeds_complete"], row["failed"], row["seeds_expected"]) == ("2", "1", "3")
    assert float(row["final_mean"]) == pytest.approx(0.43)


def test_open_question_numbers(bench: Path):
    (p,) = report.discover([bench])
    q = cell(report.summarise_protocol(p), "r1")["matrices"]
    # I_m is the same in every seed: its spread equals the hand-normalised one
    raw = [importance_of(j, layer) for layer in range(LAYERS) for j in range(len(KINDS))]
    imp = [v / sum(raw) for v in raw]
    assert q["importance"]["min"] == pytest.approx(min(imp)) and q["importance"]["max"] == pytest.approx(max(imp))
    assert q["importance"]["uniform"] == pytest.approx(1 / len(imp))
    assert q["weights"]["relative_range"] == pytest.approx(analysis.uniformity_of_weights(imp)["relative_range"])
    # FW-LoRA's norms are LoRA's times (0.5 + 5 I): shrinkage grows as I falls
    fw = q["fw_vs_lora"]
    assert fw["pairs"] == 3
    expected_log = statistics.fmean(math.log(0.5 + 5 * i) for i in imp)
    assert fw["mean_log_ratio"] == pytest.approx(expected_log)
    assert fw["importance_spearman"] == pytest.approx(1.0)
    assert q["adalora_rank"]["zero_fraction"] == pytest.approx(2 / 6)  # ranks j % 4 over six kinds: 0,1,2,3,0,1


def test_uniform_shrinkage_is_reported_as_such(tmp_path: Path):
    root = tmp_path / "uniform"
    write_bench(root, labels=("r2",), methods=("lora", "fwlora"), seeds=2)
    for seed in range(2):
        for m in ("lora", "fwlora"):
            write_run(root, "cola", "r2", m, seed, final=0.5, shrink_low=False)
    (p,) = report.discover([root])
    fw = report.summarise_protocol(p)["cells"][0]["matrices"]["fw_vs_lora"]
    assert fw["mean_log_ratio"] == pytest.approx(math.log(0.5))
    assert fw["std_log_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert fw["spearman"] == pytest.approx(1.0)
    # a constant ratio carries no ordering: no correlation, per seed or on average
    assert all(math.isnan(r["importance_spearman"]) for r in fw["by_seed"]) and fw.get("importance_spearman") is None


def test_verdict_changes_with_the_numbers(tmp_path: Path):
    def verdict(fw_finals: list[float], fw_train: float) -> str:
        root = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        write_bench(root, labels=("r2",), seeds=3)
        for seed in range(3):
            write_run(root, "cola", "r2", "lora", seed, final=0.50, train=100.0)
            write_run(root, "cola", "r2", "adalora", seed, final=[0.50, 0.52, 0.48][seed], train=112.0)
            write_run(root, "cola", "r2", "fwlora", seed, final=fw_finals[seed], train=fw_train)
        (p,) = report.discover([root])
        return next(v for v in report.summarise_protocol(p)["cells"][0]["verdicts"] if v.startswith("**Verdict**"))

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
    lora, fw = s["cells"][0]["methods"]["lora"], s["cells"][0]["methods"]["fwlora"]
    assert lora["seeds_text"] == "1/3 seeds, 1 running, 1 interrupted"
    assert lora["final"]["mean"] == pytest.approx(0.5) and lora["final"]["n"] == 1
    assert fw["seeds_text"] == "0/3 seeds, 3 missing"
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
    labels = [p["label"] for p in summary["protocols"]]
    assert labels == ["shared_lr", "tuned"]
    tuned = summary["protocols"][1]
    assert tuned["settings"]["per_method"]["lr"] == {"lora": 2e-4, "adalora": 1e-3}
    assert "shared_lr" in summary["main_table"] and "tuned" in summary["main_table"]
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
    assert "epochs = 1 (1 run) (METHOD.md: 3)" in notes


# ---- the command line ------------------------------------------------------------------------------


def test_cli_missing_path_exits_2(tmp_path: Path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_prints_table_and_path(bench: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli_out"
    assert cli.main(["report", str(bench), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FW-LoRA − AdaLoRA [95 % CI]" in printed and str(out / "report.md") in printed
    assert (out / "report.md").is_file()


def test_records_rebuild_the_same_report_and_leave_checkpoints_behind(bench: Path, tmp_path: Path, capsys):
    from fwlora.records import Status, run_status

    heavy = bench / "cola" / "r2" / "lora" / "seed0"
    (heavy / "adapter").mkdir()
    (heavy / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    (heavy / "checkpoint").mkdir()
    (heavy / "checkpoint" / "config.json").write_text("{}")  # a checkpoint's own config.json is not a run's
    out = tmp_path / "committed"
    assert cli.main(["report", str(bench), "--output", str(out), "--records"]) == 0
    assert "records: 18 runs" in capsys.readouterr().out  # 16 complete, 1 failed (result only), 1 started (config only)
    records = out / "records" / bench.name
    copied = sorted(str(p.relative_to(records)) for p in records.rglob("*") if p.is_file())
    assert "bench.json" in copied and "cola/r2/lora/seed0/result.json" in copied
    assert not any("adapter" in p or "checkpoint" in p for p in copied)
    assert len(copied) == 1 + 16 * 2 + 2  # bench.json; config + result per complete run; the failed one's result; the started one's config
    for p in copied:  # byte for byte
        assert (records / p).read_bytes() == (bench / p).read_bytes()
    assert run_status(records / "cola" / "r2" / "lora" / "seed0") == Status.COMPLETE  # what bench skips
    assert run_status(records / "cola" / "r2" / "fwlora" / "seed2") == Status.RUNNING  # what bench would run
    rebuilt = tmp_path / "rebuilt"
    assert cli.main(["report", str(records), "--output", str(rebuilt)]) == 0
    first, second = (json.loads((d / "summary.json").read_text()) for d in (out, rebuilt))
    assert first["protocols"][0]["cells"] == second["protocols"][0]["cells"]
    # reporting the records into their own report directory copies nothing onto itself
    assert cli.main(["report", str(records), "--output", str(out), "--records"]) == 0
    assert "records: 0 runs" in capsys.readouterr().out


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "RUN_DIR" in text and "--output" in text and "examples" in text


# ---- release 2: schema-2 records, any set of methods ---------------------------------------------


# a schema-2 config holds the shared settings and the run's own method's settings only
SHARED2 = {k: v for k, v in RELEASE1_CONFIG.items()
           if not k.startswith(("fw_", "adalora_")) and k not in ("lambda_fw", "allow_late_penalty")}
OWN2 = {"fwlora": {"lambda_fw": 1e-4, "fw_warmup_steps": 500, "fw_beta": 0.98, "fw_estimator": "exact",
                   "fw_sketch_size": 8, "fw_measure_every": None, "fw_normalization": "sum", "fw_gamma": 1.0,
                   "allow_late_penalty": False}}
LLAMA_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def write_run2(root: Path, task: str, budget: str, method: str, seed: int, values: list[float], *, label: str | None = None,
               metric: str = "accuracy", higher: bool = True, train: float = 100.0, step: float = 0.1,
               majority: dict | None = None, params: tuple | None = None, timing: dict | None = None,
               matrices: list | None = None, method_info: dict | None = None, **own) -> Path:
    """A schema-2 run directory written by fwlora.records, with metric `values` per epoch."""
    run = root / task / budget / (label or method) / f"seed{seed}"
    rank = int(budget[1:])
    cfg = {**SHARED2, **OWN2.get(method, {}), **own, "task": task, "method": method, "seed": seed, "rank": rank,
           "label": label, "output_dir": str(run)}
    epochs = [{"epoch": e, "step": 10 * e, "loss": 0.5, metric: v, "train_seconds": train * e / len(values)}
              for e, v in enumerate(values, start=1)]
    budget_info = {"rank": rank, "adapter_params": 100 * rank, "backbone_params": 100_000, "head_params": 770,
                   "percent": 0.1 * rank, "adapter_trainable_params": 100 * rank, "lora_alpha": 2.0 * rank}
    if params:
        budget_info.update(zip(("trained_adapter_params_initial", "trained_adapter_params_final",
                                "trained_adapter_params_mean"), params))
    record = RunRecord(status=Status.COMPLETE, task=task, method=method, seed=seed, config=cfg, metric=metric,
                       higher_is_better=higher, final=epochs[-1],
                       best=(max if higher else min)(epochs, key=lambda e: e[metric]), epochs=epochs,
                       budget=budget_info, method_info=method_info or {},
                       timing={"train_seconds": train, "step_seconds_median": step, **(timing or {})},
                       matrices=matrices or [], data={"source": "synthetic", "train_examples": 100, "eval_examples": 50,
                                                      "majority": majority},
                       env={"command": "fwlora train ..."})
    write_config(run, cfg, {})
    write_result(run, record)
    return run


def llama_matrices(column: str, value) -> list[dict]:
    """Per-matrix rows with LLaMA-style names: layers 0-1, seven kinds; `value(layer, j)` fills `column`."""
    rows = []
    for layer in range(2):
        for j, kind in enumerate(LLAMA_KINDS):
            rows.append({"name": f"model.layers.{layer}.{kind}", "layer": layer, "kind": kind, "fro_norm": 1.0 + j,
                         "effective_rank": 1.0, column: value(layer, j)})
    return rows


def verdict_starting(lines: list[str], start: str) -> str:
    (line,) = [v for v in lines if v.startswith(start)]
    return line


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
    (proto,) = summary["protocols"]
    assert proto["methods"] == ["lora", "adalora", "fwlora", "mine"]  # registry order, the unknown method last
    (c,) = proto["cells"]
    lines = c["verdicts"]

    # mine - LoRA: -0.01, -0.02, +0.01, by hand
    d = [-0.01, -0.02, 0.01]
    half = T_975_DF2 * statistics.stdev(d) / math.sqrt(3)
    ci = c["pairs"]["mine-lora"]
    assert ci["mean"] == pytest.approx(-0.02 / 3) and ci["low"] == pytest.approx(-0.02 / 3 - half)
    assert "no difference detectable at 95 % with 3 seeds" in verdict_starting(lines, "mine − LoRA: ")
    # FW-LoRA - LoRA: 0.05, 0.06, 0.05 -> lower bound 0.0533 - 0.0143 > 0
    assert "FW-LoRA better than LoRA at 95 % (3 seeds)" in verdict_starting(lines, "FW-LoRA − LoRA: ")
    assert "no difference detectable" in verdict_starting(lines, "AdaLoRA − LoRA: ")
    # against AdaLoRA: FW-LoRA 0.04, 0.06, 0.06 (better); mine -0.02, -0.02, +0.02 (no difference)
    assert "FW-LoRA better than AdaLoRA at 95 % (3 seeds)" in verdict_starting(lines, "FW-LoRA − AdaLoRA: ")
    assert c["pairs"]["mine-adalora"]["diffs"] == pytest.approx([-0.02, -0.02, 0.02])
    assert "no difference detectable at 95 % with 3 seeds" in verdict_starting(lines, "mine − AdaLoRA: ")
    # a verdict line with the time hypothesis for every method but the reference; AdaLoRA keeps ~1.12x
    fw = verdict_starting(lines, "**Verdict**: FW-LoRA vs AdaLoRA: ")
    assert "FW-LoRA time 1.010x LoRA" in fw and fw.endswith(": met")
    mine = verdict_starting(lines, "**Verdict**: mine vs AdaLoRA: ")
    assert "mine time 1.300x LoRA" in mine and mine.endswith(": not met")
    assert verdict_starting(lines, "AdaLoRA time 1.120x LoRA").endswith("hypothesis: ~1.12x): close to it")
    assert not [v for v in lines if v.startswith(("LoRA − ", "**Verdict**: LoRA", "**Verdict**: AdaLoRA"))]

    pooled = proto["pooled"]["sst2"]["verdicts"]
    assert any(v.startswith("mine − AdaLoRA: ") for v in pooled)
    assert any(v.startswith("mine time 1.300x LoRA over 3 pairs") and v.endswith("not met") for v in pooled)
    header = summary["main_table"].splitlines()[2]
    assert header == ("| task (metric) | budget (rank, LoRA %) | LoRA | AdaLoRA | FW-LoRA | mine | FW-LoRA time / LoRA | "
                      "mine time / LoRA | AdaLoRA time / LoRA | FW-LoRA − AdaLoRA [95 % CI] | mine − AdaLoRA [95 % CI] |")
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# LoRA vs AdaLoRA vs FW-LoRA vs mine: report")
    assert "**Verdict**: mine vs AdaLoRA" in md
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    mine_row = next(r for r in rows if r["method"] == "mine")
    assert float(mine_row["time_ratio_median"]) == pytest.approx(1.3)
    assert float(mine_row["diff_vs_lora_mean"]) == pytest.approx(-0.02 / 3)


def test_majority_class_is_flagged(tmp_path: Path):
    root = tmp_path / "majority"
    majority = {"accuracy": 0.509}
    # LoRA scores exactly the majority rate; AdaLoRA's mean 0.520 lies 0.011 above it (not flagged)
    for method, values in (("lora", [0.509, 0.509]), ("adalora", [0.515, 0.525]), ("fwlora", [0.60, 0.62])):
        for seed, v in enumerate(values):
            write_run2(root, "sst2", "r2", method, seed, [v], majority=majority)
    summary = report.write_report([root], tmp_path / "out")
    (c,) = summary["protocols"][0]["cells"]
    assert c["majority"] == pytest.approx(0.509)
    assert {m: s["at_majority"] for m, s in c["methods"].items()} == {"lora": True, "adalora": False, "fwlora": False}
    row = summary["main_table"].splitlines()[-1]
    assert "| 0.509 ± 0.000 (at majority class) |" in row and "| 0.520 ± 0.007 |" in row
    note = "(LoRA at the majority class: did not learn)"
    assert note in verdict_starting(c["verdicts"], "AdaLoRA − LoRA: ")
    assert note in verdict_starting(c["verdicts"], "FW-LoRA − LoRA: ")
    assert "majority" not in verdict_starting(c["verdicts"], "FW-LoRA − AdaLoRA: ")
    with_lora = [v for v in summary["protocols"][0]["pooled"]["sst2"]["verdicts"] if " − LoRA: " in v]
    assert len(with_lora) == 2 and all(note in v for v in with_lora)
    assert "at majority class" in (tmp_path / "out" / "report.md").read_text()


def test_majority_class_of_release1_records(tmp_path: Path):
    # release 1 recorded no majority rate: MCC's is 0 for any constant predictor; accuracy's is unknown
    root = tmp_path / "r1"
    write_run(root, "cola", "r2", "lora", 0, final=0.005)
    write_run(root, "cola", "r2", "fwlora", 0, final=0.30)
    write_run(root, "sst2", "r2", "lora", 0, final=0.50)
    (p,) = report.discover([root])
    cola, sst2 = report.summarise_protocol(p)["cells"]
    assert cola["majority"] == 0.0 and cola["methods"]["lora"]["at_majority"]
    assert not cola["methods"]["fwlora"]["at_majority"]
    assert sst2["majority"] is None and not sst2["methods"]["lora"]["at_majority"]


def test_variants_are_columns_of_their_own(tmp_path: Path):
    root = tmp_path / "variants"
    for seed in range(2):
        write_run2(root, "sst2", "r2", "lora", seed, [0.50 + 0.01 * seed])
        write_run2(root, "sst2", "r2", "fwlora", seed, [0.52 + 0.01 * seed])
        write_run2(root, "sst2", "r2", "fwlora", seed, [0.55 + 0.02 * seed], label="fwlora_exact", fw_measure_every=1)
    (p,) = report.discover([root])  # one protocol: the variant's runs are not repeats of FW-LoRA's
    assert sorted({r.label for r in p.runs}) == ["fwlora", "fwlora_exact", "lora"]
    s = report.summarise_protocol(p)
    assert s["methods"] == ["lora", "fwlora", "fwlora_exact"]
    assert s["names"] == {"lora": "LoRA", "fwlora": "FW-LoRA", "fwlora_exact": "fwlora_exact"}
    assert s["method_of"]["fwlora_exact"] == "fwlora"
    (c,) = s["cells"]
    assert c["methods"]["fwlora_exact"]["final"]["mean"] == pytest.approx(0.56)
    assert c["pairs"]["fwlora_exact-lora"]["diffs"] == pytest.approx([0.05, 0.06])
    assert any(v.startswith("fwlora_exact − LoRA: ") for v in c["verdicts"])
    # a variant is also paired with its own method's column: 0.55 - 0.52, 0.57 - 0.53
    assert c["pairs"]["fwlora_exact-fwlora"]["diffs"] == pytest.approx([0.03, 0.04])
    assert any(v.startswith("fwlora_exact − FW-LoRA: +0.035") for v in c["verdicts"])
    assert any(v.startswith("**Verdict**: fwlora_exact vs AdaLoRA: no AdaLoRA runs") for v in c["verdicts"])
    # FW-LoRA's setting concerns both of its columns, not LoRA's
    assert s["settings"]["per_method"]["fw_measure_every"] == {"fwlora": None, "fwlora_exact": 1}
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
    (c,) = report.summarise_protocol(p)["cells"]
    fw = c["methods"]["fwlora"]
    assert fw["warmup_step_seconds_median"]["mean"] == pytest.approx(0.13)
    assert fw["warmup_seconds"]["mean"] == pytest.approx(5.0)
    assert ("FW-LoRA median step: 0.1300 s during the Fisher warm-up, 0.1000 s after it (LoRA: 0.1000 s)"
            in c["verdicts"])
    assert "mine median step: 0.2000 s during its warm-up, 0.0900 s after it (LoRA: 0.1000 s)" in c["verdicts"]
    # release 1's fw_* names: FW-LoRA's warm-up step at r1 is 1.3 x its median step (0.101, 0.203, 0.13)
    (p1,) = report.discover([bench])
    r1 = cell(report.summarise_protocol(p1), "r1")["methods"]["fwlora"]
    assert r1["warmup_step_seconds_median"]["mean"] == pytest.approx(1.3 * statistics.mean([0.101, 0.203, 0.13]))
    assert r1["after_warmup_step_seconds_median"]["mean"] == pytest.approx(statistics.mean([0.101, 0.203, 0.13]))
    assert r1["warmup_seconds"]["mean"] == pytest.approx(5.0)


def test_parameters_trained_over_the_run(bench: Path, tmp_path: Path):
    root = tmp_path / "params"
    write_run2(root, "sst2", "r2", "lora", 0, [0.5], params=(200, 200, 200.0))
    write_run2(root, "sst2", "r2", "fwrank", 0, [0.5], params=(1000, 800, 912.4))
    (p,) = report.discover([root])
    (c,) = report.summarise_protocol(p)["cells"]
    fr = c["methods"]["fwrank"]
    assert fr["params"] == {"initial": 1000, "final": 800, "mean": 912.4}
    assert fr["actual_percent"] == pytest.approx(100 * 912.4 / 100_000)  # the mean over steps is the budget spent
    table = report.detail_table(c, report.summarise_protocol(p))
    assert "| fwrank | 1/1 seed | " in table and "| 1,000 → 800 (mean 912) |" in table
    assert "| LoRA | 1/1 seed | " in table and "| 200 |" in table
    # release 1: the one trainable count (AdaLoRA at r1: 16 x 2 x 6 + 50)
    (p1,) = report.discover([bench])
    assert "| 242 |" in report.detail_table(cell(report.summarise_protocol(p1), "r1"))


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
    (proto,) = summary["protocols"]
    (name,) = proto["plots"]["ranks"]
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    md = (out / "report.md").read_text()
    assert f"![{name}]({name})" in md and "Rank allocation" in md
    ranks = proto["cells"][0]["matrices"]["ranks"]
    assert ranks["fwrank"]["total_mean"] == pytest.approx(2 * (1 + 2 + 3 + 1 + 2 + 3 + 1))
    assert ranks["adalora"]["zero_fraction"] == pytest.approx(4 / 7)  # kinds 0, 2, 4, 6 pruned to 0
    assert "fwrank's final rank pattern" in md and "AdaLoRA's final rank pattern" in md
    # no fwrank, no figure (the release-1 bench of test_report_files_plots_and_links has none either)
    assert "ranks" not in report.write_report([root / "sst2" / "r2" / "lora"], tmp_path / "o2")["protocols"][0]["plots"]


def test_lower_is_better_wording(tmp_path: Path):
    root = tmp_path / "loss"
    for method, finals in (("lora", [2.0, 2.1, 2.2]), ("fwlora", [1.8, 1.85, 2.0])):
        for seed, v in enumerate(finals):  # epochs: v + 0.5, v - 0.1 (the best: the lowest), v
            write_run2(root, "alpaca", "r2", method, seed, [v + 0.5, v - 0.1, v], metric="eval_loss", higher=False)
    summary = report.write_report([root], tmp_path / "out")
    (proto,) = summary["protocols"]
    (c,) = proto["cells"]
    lora = c["methods"]["lora"]
    assert lora["best"]["mean"] == pytest.approx(2.0) and lora["best_epoch"]["mean"] == pytest.approx(2.0)
    # FW-LoRA - LoRA: -0.2, -0.25, -0.2: a lower loss, so FW-LoRA is the better one
    ci = c["pairs"]["fwlora-lora"]
    assert ci["high"] < 0
    assert "FW-LoRA better than LoRA at 95 % (3 seeds)" in verdict_starting(c["verdicts"], "FW-LoRA − LoRA: ")
    assert "FW-LoRA better than LoRA at 95 % (3 pairs)" in proto["pooled"]["alpaca"]["verdicts"][0]
    assert "| alpaca (eval_loss, lower is better) | r2" in summary["main_table"]
    assert c["majority"] is None and not lora["at_majority"]
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
