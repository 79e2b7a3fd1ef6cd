"""Equal-effort learning rates (fwlora.lr_search): the search grid, the choice rule against hand-computed
shortfalls, the frozen preset feeding the bench's plan, and the rule that a frozen preset is committed first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fwlora import lr_search
from fwlora.bench import load_preset, plan
from fwlora.errors import UserError
from fwlora.records import RunRecord, Status, write_result

PRESET = {
    "source": "test",
    "grid": {"tasks": ["cola", "sst2"], "methods": ["lora", "lora_r3"], "ranks": [1, 2], "seeds": 3},
    "variants": {"lora_r3": {"method": "lora", "rank": 3}},
    "lr_search": {"lrs": [1.0e-3, 2.0e-4, 5.0e-4], "seed": 100, "ranks": [2]},
    "train": {"model": "minilm", "epochs": 1},
}


def test_lr_label_is_short_and_exact():
    assert [lr_search.lr_label(v) for v in (2e-4, 5e-4, 1e-3, 2.5e-4, 0.01)] == \
        ["2e-4", "5e-4", "1e-3", "2.5e-4", "1e-2"]


def test_search_grid_is_every_column_at_every_lr_on_the_design_seed(tmp_path):
    searched = lr_search.search_preset(PRESET)
    cells = plan(searched, tmp_path, {}, {})
    got = sorted((c.task, c.budget_label, c.method, c.seed, c.config.lr, c.config.rank) for c in cells)
    want = sorted((t, "r2", f"{col}_lr{lab}", 100, lr, 3 if col == "lora_r3" else 2)
                  for t in ("cola", "sst2") for col in ("lora", "lora_r3")
                  for lab, lr in (("2e-4", 2e-4), ("5e-4", 5e-4), ("1e-3", 1e-3)))
    assert got == want
    assert PRESET["grid"]["seeds"] == 3  # the preset itself is untouched


def _record(column: str, lr: float, task: str, value: float | None, metric: str = "mcc",
            higher: bool = True) -> RunRecord:
    status = Status.FAILED if value is None else Status.COMPLETE
    return RunRecord(status=status, task=task, method="lora", seed=100, metric=metric, higher_is_better=higher,
                     config={"label": lr_search.column_label(column, lr)},
                     final=None if value is None else {metric: value})


def test_choice_sums_each_tasks_shortfall_by_hand():
    lrs = (2e-4, 5e-4, 1e-3)
    # cola (MCC): best 0.50 at 5e-4; sst2 (accuracy): best 0.93 at 1e-3
    cola = {2e-4: 0.40, 5e-4: 0.50, 1e-3: 0.47}
    sst2 = {2e-4: 0.90, 5e-4: 0.905, 1e-3: 0.93}
    records = [_record("lora", lr, "cola", v) for lr, v in cola.items()]
    records += [_record("lora", lr, "sst2", v, metric="accuracy") for lr, v in sst2.items()]
    choice = lr_search.choose(["lora"], lrs, records)["lora"]
    # shortfalls: 2e-4: 0.10 + 0.03 = 0.13; 5e-4: 0 + 0.025 = 0.025; 1e-3: 0.03 + 0 = 0.03
    assert choice.shortfall == pytest.approx({"2e-4": 0.13, "5e-4": 0.025, "1e-3": 0.03})
    assert choice.chosen == 5e-4


def test_choice_failed_run_scores_worst_ties_go_to_the_smaller_lr_and_direction_counts():
    lrs = (2e-4, 5e-4, 1e-3)
    failed = [_record("a", 2e-4, "cola", 0.3), _record("a", 5e-4, "cola", None), _record("a", 1e-3, "cola", 0.2)]
    assert lr_search.choose(["a"], lrs, failed)["a"].shortfall == pytest.approx({"2e-4": 0, "5e-4": 0.1, "1e-3": 0.1})
    tie = [_record("b", lr, "cola", 0.5) for lr in lrs]
    assert lr_search.choose(["b"], lrs, tie)["b"].chosen == 2e-4
    loss = [_record("c", lr, "sharegpt", v, metric="loss", higher=False) for lr, v in zip(lrs, (2.1, 1.9, 2.0))]
    assert lr_search.choose(["c"], lrs, loss)["c"].chosen == 5e-4


def test_a_choice_at_the_grid_s_end_is_flagged():
    lrs = (2e-4, 5e-4, 1e-3)
    rising = [_record("up", lr, "cola", v) for lr, v in zip(lrs, (0.3, 0.4, 0.5))]
    inside = [_record("mid", lr, "cola", v) for lr, v in zip(lrs, (0.3, 0.5, 0.4))]
    falling = [_record("down", lr, "cola", v) for lr, v in zip(lrs, (0.5, 0.4, 0.3))]
    choices = lr_search.choose(["up", "mid", "down"], lrs, rising + inside + falling)
    assert {c: ch.edge for c, ch in choices.items()} == {"up": "largest", "mid": None, "down": "smallest"}
    assert "up: lr 1e-3 (the grid's largest lr: one beyond it was not tried)" in lr_search.describe(choices)
    assert "mid: lr 5e-4\n" in lr_search.describe(choices)


def test_choice_refuses_a_missing_lr_and_a_column_that_failed_everywhere():
    lrs = (2e-4, 5e-4)
    with pytest.raises(UserError, match="no run of lora at lr 0.0005"):
        lr_search.choose(["lora"], lrs, [_record("lora", 2e-4, "cola", 0.3)])
    with pytest.raises(UserError, match="failed at every lr"):
        lr_search.choose(["lora"], lrs, [_record("lora", lr, "cola", None) for lr in lrs])


def test_frozen_preset_carries_each_columns_lr_into_the_bench(tmp_path):
    searched = lr_search.search_preset(PRESET)
    scores = {"lora": {2e-4: 0.2, 5e-4: 0.4, 1e-3: 0.3}, "lora_r3": {2e-4: 0.1, 5e-4: 0.2, 1e-3: 0.35}}
    for cell in plan(searched, tmp_path, {}, {}):
        column, _, label = cell.method.rpartition("_lr")
        value = scores[column][cell.config.lr]
        write_result(Path(cell.config.output_dir), _record(column, cell.config.lr, cell.task, value))
    path, choices = lr_search.freeze(PRESET, tmp_path, commit="abc123")
    assert {c: ch.chosen for c, ch in choices.items()} == {"lora": 5e-4, "lora_r3": 1e-3}
    frozen = load_preset(str(path))
    assert frozen["lr_choice"]["chosen"] == {"lora": 5e-4, "lora_r3": 1e-3}
    assert frozen["lr_choice"]["search_commit"] == "abc123" and "lr_search" not in frozen
    assert frozen["lr_choice"]["at_edge"] == {"lora_r3": "largest"}  # lora's 5e-4 is inside the grid
    cells = plan(frozen, tmp_path / "eval", {}, {})
    assert {(c.method, c.config.lr) for c in cells} == {("lora", 5e-4), ("lora_r3", 1e-3)}
    assert {c.seed for c in cells} == {0, 1, 2} and {c.config.rank for c in cells} == {1, 2, 3}
    assert "lora" in lr_search.describe(choices) and "* lr 1e-3" in lr_search.describe(choices)


def test_a_frozen_preset_must_be_committed_unchanged(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    path = tmp_path / "frozen.yaml"
    frozen = {k: v for k, v in PRESET.items() if k not in ("source", "lr_search")}
    path.write_text(yaml.safe_dump({**frozen, "lr_choice": {"chosen": {"lora": 5e-4}}}))
    with pytest.raises(UserError, match="not committed"):
        lr_search.check_committed(load_preset(str(path)))
    git("add", "frozen.yaml")
    git("commit", "-qm", "frozen")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert lr_search.check_committed(load_preset(str(path))) == head
    path.write_text(path.read_text() + "\n# edited\n")
    with pytest.raises(UserError, match="not committed"):
        lr_search.check_committed(load_preset(str(path)))
    assert lr_search.check_committed({"source": str(path)}) is None  # not a frozen preset: nothing to check


def test_bench_refuses_an_unsearched_preset_in_one_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in PRESET.items() if k != "source"}))
    out = subprocess.run([sys.executable, "-m", "fwlora", "bench", "--preset", str(preset), "--output-dir", str(tmp_path / "o"),
                          "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "--lr-search" in out.stderr


def test_a_failed_runs_default_direction_does_not_flip_a_lower_is_better_choice():
    lrs = (2e-4, 5e-4, 1e-3)
    records = [_record("c", 2e-4, "chat", 2.1, metric="loss", higher=False),
               _record("c", 5e-4, "chat", 1.9, metric="loss", higher=False),
               _record("c", 1e-3, "chat", None)]  # a failed record carries the default higher_is_better=True
    choice = lr_search.choose(["c"], lrs, records)["c"]
    assert choice.chosen == 5e-4 and choice.shortfall == pytest.approx({"2e-4": 0.2, "5e-4": 0.0, "1e-3": 0.2})


def test_the_search_runs_at_one_size_only(tmp_path):
    with pytest.raises(UserError, match="one rank or one budget"):
        lr_search.search_preset({**PRESET, "lr_search": {"lrs": [1e-3, 2e-3], "ranks": [2, 8]}})
    searched = lr_search.search_preset({**PRESET, "grid": {**PRESET["grid"], "ranks": "4,8"},
                                        "lr_search": {"lrs": [1e-3, 2e-3]}})
    assert {c.config.rank for c in plan(searched, tmp_path, {}, {}) if c.method.startswith("lora_lr")} == {4}


def test_bench_refuses_one_lr_for_every_column_of_a_search(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in PRESET.items() if k != "source"}))
    out = subprocess.run([sys.executable, "-m", "fwlora", "bench", "--preset", str(preset), "--lr-search",
                          "--set", "lr=1e-3", "--output-dir", str(tmp_path / "o"), "--dry-run"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--set lr" in out.stderr


def test_bench_refuses_a_flag_the_search_would_silently_replace(tmp_path):
    """The search sets the seed always, and tasks and size where its block names them: --tasks rte with
    --lr-search must not run CoLA unannounced (nor tune on a held-out task); --methods still narrows."""
    fixed = lr_search.fixed_by_search({**PRESET, "lr_search": {**PRESET["lr_search"], "tasks": ["cola", "sst2"]}})
    assert fixed == {"seeds": "the design seed 100", "tasks": "cola, sst2", "ranks": "rank 2", "budgets": "rank 2"}
    assert set(lr_search.fixed_by_search({**PRESET, "lr_search": {"lrs": [1e-3, 2e-3]}})) == {"seeds"}
    assert lr_search.fixed_by_search({k: v for k, v in PRESET.items() if k != "lr_search"}) == {}
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({k: v for k, v in PRESET.items() if k != "source"}))
    base = [sys.executable, "-m", "fwlora", "bench", "--preset", str(preset), "--lr-search", "--output-dir",
            str(tmp_path / "o"), "--dry-run"]
    out = subprocess.run([*base, "--ranks", "8"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "--ranks does not apply to --lr-search" in out.stderr and "rank 2" in out.stderr
    out = subprocess.run([*base, "--seeds", "3"], capture_output=True, text=True)
    assert out.returncode == 2 and "design seed 100" in out.stderr
    out = subprocess.run([*base, "--methods", "lora"], capture_output=True, text=True)
    assert out.returncode == 0 and "lora_r3" not in out.stdout and "lora_lr1e-3" in out.stdout, out.stderr
