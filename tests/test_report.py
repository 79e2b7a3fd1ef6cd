"""`fwlora report` on synthetic run directories whose numbers are chosen here, checked against hand
computations (no training, no network)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from fwlora import analysis, cli, report
from fwlora.config import TrainConfig
from fwlora.errors import UserError
from fwlora.files import write_json

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


def config(task: str, method: str, seed: int, rank: int, out: Path, **overrides) -> dict:
    values = {"task": task, "method": method, "seed": seed, "rank": rank, "output_dir": str(out), **overrides}
    return TrainConfig.from_dict(values).to_dict()


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
                                                      **{k: v for k, v in kw.items() if k in TrainConfig.__dataclass_fields__}),
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
    assert report.fw_time_verdict(1.005) == "met"
    assert report.fw_time_verdict(1.19) == "not met"
    assert report.adalora_time_verdict(1.13) == "close to it"
    assert report.adalora_time_verdict(1.40) == "slower than that"


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


# ---- the whole report on a synthetic bench ---------------------------------------------------------


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
    ref = TrainConfig(model="roberta-base").to_dict()
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


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "RUN_DIR" in text and "--output" in text and "examples" in text
