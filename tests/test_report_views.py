"""What the report hands on: the command line, summary.json and summary.csv (read by benchmarks/), a method's
own section through the registry, and the learning rates a frozen preset chose."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from pathlib import Path

import pytest
from report_runs import make_bench, write_bench, write_run, write_run2

from fwlora import cli, report
from fwlora.files import write_json


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    return make_bench(tmp_path / "quick")


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
    # 16 complete, 1 failed (result only), 1 started (config only)
    assert "records: 18 runs" in capsys.readouterr().out
    records = out / "records" / bench.name
    copied = sorted(str(p.relative_to(records)) for p in records.rglob("*") if p.is_file())
    assert "bench.json" in copied and "cola/r2/lora/seed0/result.json" in copied
    assert not any("adapter" in p or "checkpoint" in p for p in copied)
    # bench.json; config + result per complete run; the failed one's result; the started one's config
    assert len(copied) == 1 + 16 * 2 + 2
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


# ---- the report's typed stages: views, a method's own section, learning rates ---------------------


def test_learning_rates_of_a_frozen_preset_are_shown(tmp_path: Path):
    from fwlora.lr_search import RULE, lr_label

    root = tmp_path / "frozen"
    lrs = [2e-4, 5e-4, 1e-3]
    # LoRA's 1e-3 run failed: it scores as the task's worst (0.40), so its shortfall is 0.45 - 0.40
    scores = {"lora": {"cola": {lr_label(2e-4): 0.40, lr_label(5e-4): 0.45, lr_label(1e-3): None}},
              "fwlora": {"cola": {lr_label(2e-4): 0.41, lr_label(5e-4): 0.44, lr_label(1e-3): 0.47}}}
    shortfall = {"lora": {lr_label(2e-4): 0.05, lr_label(5e-4): 0.0, lr_label(1e-3): 0.05},
                 "fwlora": {lr_label(2e-4): 0.06, lr_label(5e-4): 0.03, lr_label(1e-3): 0.0}}
    write_bench(root, labels=("r2",), methods=("lora", "fwlora"), seeds=1)
    bench = json.loads((root / "bench.json").read_text())
    bench["preset"]["lr_choice"] = {"rule": RULE, "seed": 100, "lrs": lrs, "scores": scores,
                                    "shortfall": shortfall, "chosen": {"lora": 5e-4, "fwlora": 1e-3},
                                    "at_edge": {"fwlora": "largest"}}
    write_json(root / "bench.json", bench)
    for method in ("lora", "fwlora"):
        write_run(root, "cola", "r2", method, 0, final=0.5)
    summary = report.write_report([root], tmp_path / "out")
    assert summary.protocols[0].lr_choice.chosen == {"lora": 5e-4, "fwlora": 1e-3}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "### Learning rates" in md and "design seed 100" in md
    assert "| column | chosen lr | task | lr 2e-4 | lr 5e-4 | lr 1e-3 |" in md
    assert "| LoRA | 5e-4 | cola | 0.4000 | **0.4500** | failed |" in md
    assert "| FW-LoRA | 1e-3 | cola | 0.4100 | 0.4400 | **0.4700** |" in md
    assert "| LoRA | 5e-4 | shortfall, summed over tasks | 0.0500 | **0.0000** | 0.0500 |" in md
    assert "FW-LoRA's lr is the grid's largest: one beyond it was not tried, and may do better." in md
    assert md.count("lr is the grid's") == 1  # LoRA's 5e-4 is inside the grid
    # before the main table: the lrs are part of how the runs were made
    assert md.index("### Learning rates") < md.index("### Main table")
    # a bench without a frozen preset has no such section
    loose = report.write_report([root / "cola"], tmp_path / "o2")
    assert "Learning rates" not in loose.report.read_text()


def test_a_method_contributes_its_own_report_section_through_the_registry(tmp_path: Path):
    from fwlora import methods

    seen = []

    @methods.register
    class Sectioned(methods.Method):
        name, label = "sectioned", "Sectioned LoRA"

        @classmethod
        def report_section(cls, view):
            seen.append(view)
            mine = view.column_of(cls.name)
            runs = sum(len(c.runs.get(mine, {})) for c in view.cells)
            return (f"### Sectioned's question\n\n{runs} complete runs of {view.names[mine]} "
                    f"against {view.reference}")

    try:
        root = tmp_path / "sectioned"
        for seed in range(2):
            for method in ("lora", "sectioned"):
                write_run2(root, "sst2", "r2", method, seed, [0.5 + 0.01 * seed])
        write_run2(root, "sst2", "r4", "sectioned", 0, [0.6])
        summary = report.write_report([root], tmp_path / "out")
    finally:
        methods.REGISTRY.pop("sectioned", None)
    (view,) = seen
    assert view.labels == ("lora", "sectioned") and [c.budget_label for c in view.cells] == ["r2", "r4"]
    assert sorted(view.cells[0].runs["sectioned"]) == [0, 1] and view.cells[1].runs["lora"] == {}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "### Sectioned's question\n\n3 complete runs of Sectioned LoRA against lora" in md
    # after the pooled verdicts, with FW-LoRA's own question (asked in every report) before it: registry order
    assert md.index("### Pooled over budgets") < md.index("reallocation or uniform decay?") \
        < md.index("### Sectioned's")
    sections = json.loads(summary.summary.read_text())["protocols"][0]["sections"]
    assert [s["method"] for s in sections] == ["fwlora", "sectioned"]


def test_the_report_layer_names_no_method():
    """Only methods/ names a method: the report asks the registry (reference, rival, labels, figures)."""
    import re

    from fwlora import methods

    words = {w for name, cls in methods.REGISTRY.items() for w in (name, cls.label) if w}
    alternatives = "|".join(sorted(map(re.escape, words), key=len, reverse=True))
    pattern = re.compile(r"(?<![\w-])(" + alternatives + r")(?![\w-])")
    report_dir = Path(report.__file__).parent
    for path in sorted(report_dir.glob("*.py")):
        # the package is also called fwlora: its modules and commands are not the method
        package = r"fwlora(\.\w+)+|`fwlora \w+|fwlora (report|bench|train)\b|from fwlora\b|import fwlora\b"
        text = re.sub(package, "", path.read_text())
        assert not pattern.findall(text), (path.name, sorted(set(pattern.findall(text))))


def test_summary_json_keeps_what_pool_tasks_reads(tmp_path: Path):
    """benchmarks/pool_tasks.py pools the summary.json the report writes (its keys: methods, method_of, names,
    settings, each cell's final_by_seed) to the numbers the report pooled itself."""
    import importlib.util

    root = tmp_path / "two"
    write_bench(root, tasks=("cola", "sst2"), labels=("r1",), methods=("lora", "fwlora"), seeds=3)
    finals = {("cola", "lora"): [0.20, 0.22, 0.24], ("cola", "fwlora"): [0.25, 0.21, 0.30],
              ("sst2", "lora"): [0.80, 0.81, 0.82], ("sst2", "fwlora"): [0.83, 0.80, 0.84]}
    for (task, method), values in finals.items():
        for seed, v in enumerate(values):
            write_run(root, task, "r1", method, seed, final=v)
    summary = report.write_report([root], tmp_path / "out")
    script = Path(__file__).parents[1] / "benchmarks" / "pool_tasks.py"
    spec = importlib.util.spec_from_file_location("pool_tasks_script", script)
    pool_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool_tasks)
    out = tmp_path / "pooled.md"
    assert pool_tasks.main([str(summary.summary), "--columns", "lora,fwlora", "--output", str(out)]) == 0
    per_seed = [statistics.fmean([finals[(task, "fwlora")][s] - finals[(task, "lora")][s]
                                  for task in ("cola", "sst2")]) for s in range(3)]
    pooled = summary.protocols[0].pooled_over_tasks.differences[("fwlora", "lora")].interval
    assert pooled.diffs == pytest.approx(per_seed)
    row = next(line for line in out.read_text().splitlines() if line.startswith("| FW-LoRA − LoRA |"))
    assert f"| {report.fmt_ci(pooled)} (3 seeds) |" in row
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert [f.name for f in dataclasses.fields(report.CsvRow)] == list(rows[0])
    cola_fw = next(r for r in rows if r["task"] == "cola" and r["method"] == "fwlora")
    assert float(cola_fw["diff_vs_reference_mean"]) == pytest.approx(statistics.fmean([0.05, -0.01, 0.06]))
