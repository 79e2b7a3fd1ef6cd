"""The lr search's extension past the grid's ends (lr_search `extend`): which lr a column is owed, when it stops,
and the bench's loop that runs the owed lrs, against scores chosen by hand (runs are faked: no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fwlora import lr_search
from fwlora.bench import Outcome
from fwlora.cli import main
from fwlora.errors import UserError
from fwlora.records import RunRecord, Status, run_status, write_result

GRID = (5e-4, 1e-3, 2e-3, 4e-3)
SEARCH = lr_search.LrSearch(lrs=GRID, extend=2)


def _record(column: str, lr: float, task: str, value: float | None) -> RunRecord:
    return RunRecord(status=Status.COMPLETE if value is not None else Status.FAILED, task=task, method="lora",
                     seed=100, metric="mcc", higher_is_better=True,
                     config={"label": lr_search.column_label(column, lr)},
                     final=None if value is None else {"mcc": value})


def test_the_next_lr_is_the_end_pairs_ratio_beyond_the_end():
    assert lr_search.beyond(GRID, "largest") == pytest.approx(8e-3)
    assert lr_search.beyond(GRID, "smallest") == pytest.approx(2.5e-4)
    assert lr_search.beyond((1e-4, 3e-4), "largest") == pytest.approx(9e-4)


def test_a_column_at_an_end_is_owed_one_lr_at_a_time_until_inside_or_spent():
    rising = {5e-4: 0.1, 1e-3: 0.2, 2e-3: 0.3, 4e-3: 0.4}
    records = [_record("up", lr, "cola", v) for lr, v in rising.items()]
    assert lr_search.column_lrs(SEARCH, "up", records) == (GRID, pytest.approx(8e-3))
    records.append(_record("up", 8e-3, "cola", 0.5))  # still rising: owed the next one
    lrs, owed = lr_search.column_lrs(SEARCH, "up", records)
    assert lrs == pytest.approx((*GRID, 8e-3)) and owed == pytest.approx(1.6e-2)
    records.append(_record("up", 1.6e-2, "cola", 0.6))  # extend: 2 is spent, the choice still at the end
    lrs, owed = lr_search.column_lrs(SEARCH, "up", records)
    assert owed is None and len(lrs) == 6
    assert lr_search.choose(["up"], lrs, records)["up"].edge == "largest"
    # a column whose best is at the small end, then inside once the lr below it has run
    falling = [_record("down", lr, "cola", v) for lr, v in zip(GRID, (0.5, 0.4, 0.3, 0.2))]
    assert lr_search.column_lrs(SEARCH, "down", falling)[1] == pytest.approx(2.5e-4)
    falling.append(_record("down", 2.5e-4, "cola", 0.45))
    lrs, owed = lr_search.column_lrs(SEARCH, "down", falling)
    assert owed is None and lr_search.choose(["down"], lrs, falling)["down"].chosen == 5e-4
    # nothing is owed without extend, nor to a column whose best is inside the grid
    assert lr_search.column_lrs(lr_search.LrSearch(lrs=GRID), "up", records[:4])[1] is None
    inside = [_record("mid", lr, "cola", v) for lr, v in zip(GRID, (0.2, 0.5, 0.3, 0.1))]
    assert lr_search.column_lrs(SEARCH, "mid", inside) == (GRID, None)


def test_extend_must_be_a_whole_number():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(UserError, match="extend an integer"):
            lr_search.LrSearch.from_preset({"lr_search": {"lrs": list(GRID), "extend": bad}})


def peak_at(best_lr: float):
    """An MCC that rises towards best_lr and falls past it, in log lr: 0.5 at best_lr."""
    return lambda lr: 0.5 - 0.05 * abs(math.log2(lr / best_lr))


def test_the_bench_runs_the_owed_lrs_and_freezes_from_all_of_them(tmp_path, monkeypatch):
    """`--lr-search` with extend 2: "low" peaks just under the grid's smallest lr (one more below it shows the
    smallest is best after all), "high" at 3.2e-2 (three above: it gets two and stays at the end), "mid" inside.
    The fake bench scores each run by its column's curve."""
    curves = {"low": peak_at(4.5e-4), "high": peak_at(3.2e-2), "mid": peak_at(1e-3)}
    ran = []

    def fake_run_bench(cells, output_dir, **_):
        out = {}
        for cell in cells:
            column = cell.method.rpartition("_lr")[0]
            ran.append((column, cell.config.lr))
            write_result(Path(cell.config.output_dir), _record(column, cell.config.lr, cell.task,
                                                               curves[column](cell.config.lr)))
            out[cell.key] = Outcome.COMPLETE
        return out

    monkeypatch.setattr("fwlora.cli.bench.run_bench", fake_run_bench)
    monkeypatch.setattr("fwlora.cli.bench.check_data", lambda cells: None)
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({
        "grid": {"tasks": ["cola"], "methods": ["low", "high", "mid"], "ranks": [2], "seeds": 3},
        "variants": {c: {"method": "lora"} for c in curves},
        "lr_search": {"lrs": list(GRID), "seed": 100, "extend": 2},
        "train": {"model": "minilm", "epochs": 1}}))
    out_dir = tmp_path / "search"
    assert main(["bench", "--preset", str(preset), "--lr-search", "--output-dir", str(out_dir), "--no-report"]) == 0
    extra = sorted((c, round(lr, 10)) for c, lr in ran if lr not in GRID)
    assert extra == [("high", 8e-3), ("high", 1.6e-2), ("low", 2.5e-4)]
    assert len(ran) == 3 * len(GRID) + 3  # every grid lr once, each owed lr once
    frozen = yaml.safe_load((out_dir / lr_search.FROZEN_FILE).read_text())
    choice = frozen["lr_choice"]
    assert choice["chosen"] == pytest.approx({"low": 5e-4, "high": 1.6e-2, "mid": 1e-3})
    assert choice["at_edge"] == {"high": "largest"}  # spent: flagged, as a grid end is
    assert choice["extended"] == {"low": pytest.approx([2.5e-4]), "high": pytest.approx([8e-3, 1.6e-2])}
    assert choice["extend"] == 2 and "up to 2 per column" in choice["rule"]
    assert set(choice["scores"]["high"]["cola"]) == {"5e-4", "1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2"}
    # an extension interrupted half-way is owed again: the next call resumes it (and nothing else), same freeze
    high = out_dir / "cola" / "r2" / lr_search.column_label("high", 1.6e-2) / "seed100"
    write_result(high, RunRecord(status=Status.INTERRUPTED, task="cola", method="lora", seed=100, metric="mcc",
                                 config={"label": lr_search.column_label("high", 1.6e-2)}))
    ran.clear()

    def resume_only(cells, output_dir, **kw):
        todo = [c for c in cells if run_status(Path(c.config.output_dir)) != Status.COMPLETE]
        return {**fake_run_bench(todo, output_dir), **{c.key: Outcome.COMPLETE for c in cells if c not in todo}}

    monkeypatch.setattr("fwlora.cli.bench.run_bench", resume_only)
    assert main(["bench", "--preset", str(preset), "--lr-search", "--output-dir", str(out_dir), "--no-report"]) == 0
    assert [(c, round(lr, 10)) for c, lr in ran] == [("high", 1.6e-2)]
    planned = json.loads((out_dir / "bench.json").read_text())["runs"]  # the extensions are in the plan it wrote
    assert {"cola/r2/low_lr2.5e-4/seed100", "cola/r2/high_lr1.6e-2/seed100"} <= set(planned)
    assert len(planned) == 3 * len(GRID) + 3
    assert yaml.safe_load((out_dir / lr_search.FROZEN_FILE).read_text())["lr_choice"]["chosen"] == choice["chosen"]


def test_freeze_refuses_a_search_that_still_owes_an_lr(tmp_path):
    preset = {"source": "t", "grid": {"tasks": ["cola"], "methods": ["up"], "ranks": [2], "seeds": 1},
              "variants": {"up": {"method": "lora"}}, "train": {"model": "minilm"},
              "lr_search": {"lrs": list(GRID), "seed": 100, "extend": 1}}
    for lr, v in zip(GRID, (0.1, 0.2, 0.3, 0.4)):
        write_result(tmp_path / "cola" / "r2" / lr_search.column_label("up", lr) / "seed100", _record("up", lr, "cola", v))
    with pytest.raises(UserError, match="lr 0.008 beyond it has not run"):
        lr_search.freeze(preset, tmp_path, commit=None)
    assert lr_search.extensions(preset, tmp_path) == ({"up": pytest.approx((8e-3,))}, {"up": pytest.approx(8e-3)})
