"""The benchmark scripts' own helpers (the scripts are run by hand, not by CI)."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter

import pytest

from conftest import REPO


def load_script(name: str):
    """A benchmark script (benchmarks/NAME.py, not a package) imported as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_overhead():
    return load_script("overhead")


def test_overhead_batches_run_past_one_epoch(glue_dir, monkeypatch):
    """The agreement run may ask for more batches than the training set holds: further epochs, reshuffled."""
    monkeypatch.setattr(sys, "argv", ["overhead.py"])
    overhead = load_overhead()
    from fwlora import models

    _, tokenizer = models.load_backbone("minilm", 2, "mean")
    train, _, _ = overhead.load_task("rte", str(glue_dir))
    n, size = 100, 32
    assert n * size > len(train)
    got = overhead.batches("rte", str(glue_dir), n, size, tokenizer, seed=1)
    assert len(got) == n and all(b["input_ids"].shape[0] == size for b in got)
    epoch = len(train) // size  # the first full batches come from one pass: no sentence twice
    pad = tokenizer.pad_token_id
    first = [tuple(row[row != pad].tolist()) for b in got[:epoch] for row in b["input_ids"]]
    every = Counter(tuple(row["input_ids"]) for row in overhead.encode(train, tokenizer, 128))
    assert not Counter(first) - every  # no sentence more often than the data holds it
    later = [tuple(row[row != pad].tolist()) for b in got[epoch + 1:] for row in b["input_ids"]]
    assert set(later) <= set(every) and later[:size] != first[:size]  # the second pass, in a new order


def test_overhead_script_runs_every_variant_and_estimator(glue_dir, tmp_path):
    """A smoke-sized run of the whole script (the numbers themselves come from runs made by hand)."""
    import json
    import os
    import subprocess

    out = tmp_path / "o.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--data-dir", str(glue_dir), "--steps", "2",
           "--skip", "1", "--agreement-steps", "9", "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"fwrank-warmup", "fwrank-warmup-every1", "fw-warmup-every"} <= set(result["steps"]["median_ratio"])
    assert all("fwrank" in row for row in result["whole_run"].values())
    assert any(name.startswith("fwrank trace") for name in result["agreement"]["estimators"])


def test_fisher_profiles_figure_and_shares(tmp_path):
    """Two backbones' synthetic FW-LoRA records -> one figure and the importance shares, summing to 1."""
    import json
    import shutil
    import subprocess

    from fwlora.records import RunRecord, Status, write_result

    def write(directory, model, kinds, layers):
        rows = [{"name": f"m.layers.{layer}.{kind}", "layer": layer, "kind": kind, "importance": float(1 + i)}
                for i, (layer, kind) in enumerate((layer, kind) for layer in range(layers) for kind in kinds)]
        for seed in (0, 1):
            run = directory / f"seed{seed}"
            run.mkdir(parents=True)
            write_result(run, RunRecord(status=Status.COMPLETE, task="sst2", method="fwlora", seed=seed,
                                        config={"model": model}, matrices=rows))

    write(tmp_path / "a", "minilm", ["attention.self.query", "output.dense"], 2)
    write(tmp_path / "b", "smollm2", ["self_attn.q_proj", "mlp.down_proj"], 3)
    out = tmp_path / "fig.png"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fisher_profiles.py"), str(tmp_path / "a"),
                           str(tmp_path / "b"), "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_size > 0 and record["minilm, sst2"]["runs"] == 2
    for key in ("minilm, sst2", "smollm2, sst2"):
        assert abs(sum(record[key]["by_kind"].values()) - 1) < 1e-9 and abs(sum(record[key]["by_depth"].values()) - 1) < 1e-9
    # minilm: importances 1..4 over (0, q), (0, out), (1, q), (1, out): queries 1 + 3 of 10
    assert abs(record["minilm, sst2"]["by_kind"]["query"] - 0.4) < 1e-9
    # a third backbone later, the first two's runs gone: --previous keeps their numbers from the JSON
    write(tmp_path / "c", "mpnet", ["attention.attn.q", "output.dense"], 2)
    shutil.rmtree(tmp_path / "a")
    extended = tmp_path / "fig2.png"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fisher_profiles.py"), str(tmp_path / "c"),
                           "--previous", str(out.with_suffix(".json")), "--output", str(extended)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    again = json.loads(extended.with_suffix(".json").read_text())
    assert list(k for k in again if k != "command") == ["minilm, sst2", "smollm2, sst2", "mpnet, sst2"]
    for key in ("minilm, sst2", "smollm2, sst2"):
        assert again[key] == record[key]


def test_pool_tasks_over_two_benches_equals_the_report_pooling_one(tmp_path, capsys):
    """The committed fwrank comparison split into one summary per task (as a held-out task run in a bench of
    its own would be): pooled again, its numbers are those the report computed over the one bench."""
    import copy
    import json

    pool_tasks = load_script("pool_tasks")
    committed = json.loads((REPO / "results" / "fwrank" / "summary.json").read_text())
    protocol = committed["protocols"][0]
    paths = []
    for task in ("cola", "sst2"):
        part = copy.deepcopy(committed)
        part["protocols"][0]["cells"] = [c for c in protocol["cells"] if c["task"] == task]
        paths.append(tmp_path / f"{task}.json")
        paths[-1].write_text(json.dumps(part))
    out = tmp_path / "pooled.md"
    assert pool_tasks.main([*map(str, paths), "--columns", "lora,adalora,fwlora,fwrank", "--output", str(out)]) == 0
    text = out.read_text()
    from fwlora.report.text import fmt_ci

    for pair, name in (("fwrank-adalora", "fwrank − AdaLoRA"), ("adalora-lora", "AdaLoRA − LoRA")):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"{fmt_ci(protocol['pooled_over_tasks'][pair])} (5 seeds)" in row
    # a column run with other settings in the second bench is not one protocol
    other = json.loads(paths[1].read_text())
    other["protocols"][0]["settings"]["per_method"]["lr"]["fwrank"] = 0.002
    paths[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="column fwrank was run with other settings \\(lr\\)"):
        pool_tasks.main([*map(str, paths), "--columns", "lora,adalora,fwlora,fwrank"])
    # ... also a method's own setting, which a bench without a sibling column lists under "own" only
    other["protocols"][0]["settings"]["per_method"]["lr"]["fwrank"] = 0.001
    other["protocols"][0]["settings"]["own"]["fwrank"]["fwrank_r_max"] = [6]
    paths[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="column fwrank was run with other settings \\(fwrank_r_max\\)"):
        pool_tasks.main([*map(str, paths), "--columns", "lora,adalora,fwlora,fwrank"])
    # split by column instead (fwrank added later in a bench with LoRA again): joined on LoRA's identical runs
    by_column = []
    for keep in (("lora", "adalora", "fwlora"), ("lora", "fwrank")):
        part = copy.deepcopy(committed)
        for c in part["protocols"][0]["cells"]:
            c["methods"] = {lb: st for lb, st in c["methods"].items() if lb in keep}
        by_column.append(tmp_path / f"{'-'.join(keep)}.json")
        by_column[-1].write_text(json.dumps(part))
    assert pool_tasks.main([*map(str, by_column), "--columns", "lora,adalora,fwlora,fwrank", "--output", str(out)]) == 0
    joined = out.read_text()
    for pair, name in (("fwrank-adalora", "fwrank − AdaLoRA"), ("fwrank-lora", "fwrank − LoRA")):
        row = next(line for line in joined.splitlines() if line.startswith(f"| {name} |"))
        cola = next(c for c in protocol["cells"] if c["task"] == "cola")
        assert f"| {fmt_ci(cola['pairs'][pair])} |" in row and f"{fmt_ci(protocol['pooled_over_tasks'][pair])} (5" in row
    # ... but not when the shared column's results differ: those are other runs
    changed = json.loads(by_column[1].read_text())
    changed["protocols"][0]["cells"][0]["methods"]["lora"]["final_by_seed"]["3"] += 0.01
    by_column[1].write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="lora on cola r2 has other results per seed"):
        pool_tasks.main([*map(str, by_column), "--columns", "lora,adalora,fwlora,fwrank"])


def test_sweep_trials_lines_up_the_committed_sweeps(capsys):
    """Release 1's and release 2's CoLA sweeps drew the same learning rate for trial n in every study; each
    study's best trial appears in its row with the value its best_params.json records."""
    import json

    sweep_trials = load_script("sweep_trials")
    journals = [REPO / "results" / d / "optuna.journal" for d in ("sweep-cpu", "sweep-fwrank")]
    assert sweep_trials.main([str(j) for j in journals]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 6 and all("/" not in row[1] for row in rows)  # one learning rate per trial number
    header = ["lora", "adalora", "fwlora", "fwrank"]
    for d in ("sweep-cpu", "sweep-fwrank"):
        for method, best in json.loads((REPO / "results" / d / "best_params.json").read_text()).items():
            row = rows[best["trial"]]
            assert row[2 + header.index(method)].startswith(f"{best['value']:.3f}")
            assert row[1] == f"{best['params']['lr']:.3g}"


def test_the_committed_edge_table_rebuilds_from_its_records(tmp_path, monkeypatch):
    """results/adalora-edge/edge.md is what the command its README gives makes from the committed records
    and summaries (the command is read from the README: README, records and table cannot drift apart)."""
    import shlex

    readme = (REPO / "results" / "adalora-edge" / "README.md").read_text(encoding="utf-8")
    start = readme.index("python benchmarks/edge_table.py")
    command = readme[start:readme.index("```", start)].replace("\\\n", " ")
    argv = shlex.split(command)[2:]
    out = argv.index("--output")
    assert argv[out + 1] == "results/adalora-edge/edge.md"
    argv[out + 1] = str(tmp_path / "edge.md")
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    assert load_script("edge_table").main(argv) == 0
    committed = (REPO / "results" / "adalora-edge" / "edge.md").read_text(encoding="utf-8")
    assert (tmp_path / "edge.md").read_text(encoding="utf-8") == committed


def test_edge_table_times_only_within_one_session_and_one_machine(tmp_path):
    """A time ratio pairs runs of one session and one machine boot only: MiniLM's SST-2 step took 0.38 s on one
    session's machine and 0.48 s on another's, so a ratio across sessions measures the machines; a bench resumed
    on another machine holds runs of two boots in one directory."""
    edge = load_script("edge_table")
    a, b, c = (tmp_path / n for n in "abc")
    timings = {("cola", "lora", 0): {(a, ()): 100.0, (c, ()): 200.0}, ("cola", "wide", 0): {(b, ()): 106.0},
               ("cola", "lora", 1): {(a, ()): 100.0}, ("cola", "wide", 1): {(c, ()): 300.0}}
    assert edge.time_ratios("cola", "wide", "lora", timings, [{a, b}, {c}]) == [pytest.approx(1.06)]
    # seed 1's pair is from two sessions: left out; with all three as one session both seeds count (seed 0:
    # the median of 106/100 and 106/200)
    assert edge.time_ratios("cola", "wide", "lora", timings, [{a, b, c}]) == [pytest.approx(0.795), pytest.approx(3.0)]
    assert edge.time_ratios("cola", "lora", "lora", timings, [{a}, {b}, {c}]) == [1.0, 1.0]
    # one directory, two machines: seed 0 ran on boot x, seed 1's LoRA on x and its wide column on y; seed 2's
    # wide run started on x and was resumed on y (its seconds from both): no pair
    one = {("cola", "lora", 0): {(a, ("x",)): 100.0}, ("cola", "wide", 0): {(a, ("x",)): 103.0},
           ("cola", "lora", 1): {(a, ("x",)): 100.0}, ("cola", "wide", 1): {(a, ("y",)): 80.0},
           ("cola", "lora", 2): {(a, ("x",)): 100.0}, ("cola", "wide", 2): {(a, ("x", "y")): 90.0}}
    assert edge.time_ratios("cola", "wide", "lora", one, [{a}]) == [pytest.approx(1.03)]


def test_same_runs_totals_time_only_over_runs_timed_on_one_machine(tmp_path, capsys):
    """Two runs in both benches with the same evaluations: seed 0 timed on boot x both times (100 s -> 90 s),
    seed 1 on x before and on y after (100 s -> 50 s, a faster machine). The total is 90 / 100 = 0.90x, not
    140 / 200 = 0.70x; seed 1's seconds are shown, marked."""
    from fwlora.records import RunRecord, RunTiming, Status, write_result

    def write(bench, seed, seconds, boots):
        run = tmp_path / bench / "cola" / f"seed{seed}"
        run.mkdir(parents=True)
        epoch = {"mcc": 0.25, "loss": 0.6}
        write_result(run, RunRecord(status=Status.COMPLETE, task="cola", method="lora", seed=seed, config={},
                                    metric="mcc", final=epoch, best=epoch, epochs=[epoch],
                                    timing=RunTiming(train_seconds=seconds, eval_seconds=1.0, load_seconds=1.0,
                                                     boot_ids=boots)))

    write("before", 0, 100.0, ["x"]), write("after", 0, 90.0, ["x"])
    write("before", 1, 100.0, ["x"]), write("after", 1, 50.0, ["y"])
    assert load_script("same_runs").main([str(tmp_path / "before"), str(tmp_path / "after")]) == 0
    out = capsys.readouterr().out
    assert "| cola/seed1 | 0.2500 | 0.2500 | yes | 100.0 → 50.0* |" in out
    assert "| all 2 runs (times: the 1 timed on one machine) | | | 2 of 2 | 100.0 → 90.0 (0.90x) |" in out
    assert "left out of the time totals (1 runs)" in out


def test_the_goal_verdict_wins_per_task_and_pooled_against_the_rival_and_the_best_peft_column(tmp_path):
    """Hand-made finals: specwide is lora + 0.03 on CoLA and SST-2 and lora − 0.01 on MRPC (5 seeds); adalora
    sits at lora + 0.01, dora (the PEFT column with the highest pooled mean; rslora's is lower, widecut's higher
    but widecut is not PEFT's) at lora + 0.012. specwide beats both on 2 of 3 tasks and pooled (against dora
    +0.018, +0.018, −0.022: +0.0047 a seed, every seed the same, a zero-width interval above 0); its time is
    100.4 / 100 = 1.004x."""
    from types import SimpleNamespace

    edge = load_script("edge_table")

    def run(method, v):
        return SimpleNamespace(method=method, metric_value=lambda which: v)

    offsets = {"lora": (0, 0, 0), "adalora": (0.01, 0.01, 0.01), "dora": (0.012, 0.012, 0.012),
               "rslora": (0.005, 0.005, 0.005), "widecut": (0.05, 0.05, 0.05), "specwide": (0.03, 0.03, -0.01)}
    tasks = ["cola", "sst2", "mrpc"]
    data = {t: {label: {s: run(label, 0.5 + 0.01 * s + off[i]) for s in range(5)} for label, off in offsets.items()}
            for i, t in enumerate(tasks)}
    session = tmp_path / "bench"
    timings = {(t, label, s): {(session, ()): 100.0 + (0.4 if label == "specwide" else 0.0)}
               for t in tasks for label in offsets for s in range(5)}
    text = "\n".join(edge.goal_section(data, "specwide", tasks, "lora", "adalora", 2, None, timings, [{session}]))
    assert "| dora (best PEFT column) | +0.018 [+0.018, +0.018] | +0.018 [+0.018, +0.018] | -0.022 [" in text
    assert "| adalora | +0.020 [" in text and text.count("| 2 of 3 | yes |") == 2
    assert "| specwide | 0.537 ± 0.016 (5) | 1.00x |" in text  # 0.5 + mean(0.01 s) 0.02 + 0.05 / 3
    assert "Time: 1.00x lora's (limit 1.01x)" in text and "**Goal met**" in text  # specwide's own claim: 1.01x
    slow = {k: {(session, ()): v[(session, ())] * (1.02 if k[1] == "specwide" else 1.0)} for k, v in timings.items()}
    assert "**Goal not met**" in "\n".join(edge.goal_section(data, "specwide", tasks, "lora", "adalora", 2, None,
                                                             slow, [{session}]))
    assert "**Goal not met**" in "\n".join(edge.goal_section(data, "specwide", tasks, "lora", "adalora", 3, None,
                                                             timings, [{session}]))  # it loses MRPC


def test_the_parts_table_splits_a_gain_into_its_ideas_and_their_interaction():
    """loraone (the start) gains 0.01 over lora, widecut (the capacity) 0.02, specwide (both) 0.035 on every
    task and seed: the interaction is 0.035 − 0.01 − 0.02 = +0.005, a zero-width interval."""
    from types import SimpleNamespace

    edge = load_script("edge_table")
    gains = {"lora": 0.0, "loraone": 0.01, "widecut": 0.02, "specwide": 0.035}
    tasks = ["cola", "sst2"]
    data = {t: {m: {s: SimpleNamespace(method=m, metric_value=lambda which, v=0.5 + 0.01 * s + g: v) for s in range(4)}
                for m, g in gains.items()} for t in tasks}
    text = "\n".join(edge.parts_section(data, {"start": "loraone", "capacity": "widecut"}, "specwide", tasks, "lora"))
    assert "| task | start (loraone) − lora | capacity (widecut) − lora | together (specwide) − lora | interaction |" in text
    for t in [*tasks, "pooled"]:
        assert (f"| {t} | +0.010 [+0.010, +0.010] | +0.020 [+0.020, +0.020] | +0.035 [+0.035, +0.035] | "
                f"+0.005 [+0.005, +0.005] |") in text


def test_an_initialisation_s_share_of_the_time_gets_a_column_only_where_one_ran():
    """eva's pass took 6 s of 120 and 9 s of 150 (5 % and 6 %: median 5.5 %); lora has none."""
    from types import SimpleNamespace

    from fwlora.records import RunBudget

    edge = load_script("edge_table")

    def run(v, init=None, seconds=100.0):
        return SimpleNamespace(metric_value=lambda which: v, budget=RunBudget(), matrices=None, init_seconds=init,
                               train_seconds=seconds)

    columns = {"lora": {0: run(0.5), 1: run(0.6)}, "eva": {0: run(0.5, 6.0, 120.0), 1: run(0.6, 9.0, 150.0)}}
    rows, _ = edge.rows_for("cola", columns, ["lora", "eva"], "lora", "adalora")
    assert rows[0][-1] == "—" and rows[1][-1] == "5.5 %"
    rows, _ = edge.rows_for("cola", {"lora": columns["lora"]}, ["lora"], "lora", "adalora")
    assert not any(cell.endswith("%") for cell in rows[0][-1:]) and len(rows[0]) == 6 + len(edge.KINDS)


def test_run_times_rotates_the_order_and_pairs_each_round_with_its_own_reference():
    rt = load_script("run_times")
    columns = ["lora", "a", "b"]
    orders = [rt.rotated(columns, k) for k in range(3)]
    assert orders == [["lora", "a", "b"], ["a", "b", "lora"], ["b", "lora", "a"]]
    assert {o[0] for o in orders} == set(columns)  # no column always first
    got = rt.ratios({"lora": [100.0, 200.0, 100.0], "a": [110.0, 200.0, 130.0]}, "lora")["a"]
    assert got["rounds"] == [1.1, 1.0, 1.3] and got["median"] == 1.1 and (got["min"], got["max"]) == (1.0, 1.3)


def test_seed_table_puts_the_bench_beside_the_seed_s_expected_numbers(tmp_path):
    """The hand-chosen bench of report_runs: FW-LoRA at r2 has seeds 0-1 (0.53, 0.55), LoRA 0.50, 0.52, 0.51;
    AdaLoRA's times are 1.2, 1.1, 1.15 x LoRA's."""
    from report_runs import make_bench

    seed_table = load_script("seed_table")
    bench = make_bench(tmp_path / "bench")
    out = tmp_path / "table.md"
    assert seed_table.main([str(bench), "--shared-lr", str(bench), "--output", str(out)]) == 0
    text = out.read_text()
    assert "| cola | fwlora | 57.5 | 54.0 ± 1.4 (n=2) | 1.01x | 1.06x |" in text  # 110/100, 202/200: median 1.055
    assert "| cola | adalora | 57.8 | 52.3 ± 2.5 (n=3) | 1.12x | 1.15x |" in text
    assert "| cola | r2 | fwlora − lora | +0.030 [+0.030, +0.030]" in text  # both pairs differ by 0.03
    assert "| cola | r1 | adalora − lora | +0.020 [" in text  # seeds 0-1: +0.01, +0.03
    shared = text.split("every method at lr 2e-4")[1]
    assert shared.count("| cola |") == 17  # every run at the shared lr but the one still running
    assert "| cola | r1 | adalora | 2 | failed |" in shared
    assert "| cola | r2 (0.384 %) | fwlora | 0.540 ± 0.014 | 2 | — | — | 1.06x | 2e-4 |" in text  # lrs as the search labels them
    with pytest.raises(SystemExit) as stop:
        seed_table.main([str(tmp_path / "nowhere")])
    assert stop.value.code == 2


def test_commit_records_commits_each_finished_run_once_with_its_score(tmp_path):
    """benchmarks/commit_records.sh: a finished run is copied into the results directory and committed alone
    (a file staged by someone else stays staged, outside the commit), its message naming the run and its score;
    a run in progress (config.json only) is not; a second pass commits nothing; a missing directory, a destination
    inside the runs (each pass would copy the copies) and one git ignores (no commit could ever land) are refused."""
    import os
    import shutil
    import subprocess

    from report_runs import write_run2

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    runs = repo / "runs"
    write_run2(runs, "sst2", "r2", "lora", 0, [0.5, 0.75], train=42.0)
    (runs / "sst2" / "r2" / "lora" / "seed1").mkdir(parents=True)
    (runs / "sst2" / "r2" / "lora" / "seed1" / "config.json").write_text("{}")
    env = {**os.environ, "PYTHON": sys.executable, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_CONFIG_NOSYSTEM": "1"}
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "start")
    (repo / "notes.txt").write_text("mine")
    git("add", "notes.txt")
    script = str(REPO / "benchmarks" / "commit_records.sh")
    said = []
    for _ in range(2):  # 0 seconds: one pass, then exit; the runs directory given with a trailing slash
        done = subprocess.run([script, "runs/", "results/records", "results/x", "0"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        said.append(done.stdout)
    assert "committed sst2/r2/lora/seed0: " in said[0] and said[1] == ""
    log = git("log", "--format=%s").splitlines()
    assert log == ["results/x: sst2, lora, rank 2, seed 0, lr 0.0002: accuracy 0.750, 42 s of training (complete)",
                   "start"]
    assert git("show", "--name-only", "--format=", "HEAD").split() == [
        "results/records/sst2/r2/lora/seed0/config.json", "results/records/sst2/r2/lora/seed0/result.json"]
    assert git("diff", "--cached", "--name-only").split() == ["notes.txt"]
    assert not (repo / "results" / "records" / "sst2" / "r2" / "lora" / "seed1").exists()
    missing = subprocess.run([script, "nowhere", "results/records", "results/x", "0"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip() == "commit_records.sh: no directory nowhere"
    inside = subprocess.run([script, "runs", "runs/kept", "results/x", "0"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=60)
    assert inside.returncode == 2 and inside.stderr.strip() == "commit_records.sh: runs/kept is inside runs"
    (repo / ".gitignore").write_text("scratch/\n")
    ignored = subprocess.run([script, "runs", "scratch/records", "results/x", "0"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=60)
    assert ignored.returncode == 2 and ignored.stderr.strip() == "commit_records.sh: git ignores scratch/records"


def test_a_column_s_seed_count_is_said_once():
    """One seed: "(1 seed)" from the formatter alone; two: mean ± sample std (0.1 / sqrt 2 = 0.071) and the count."""
    edge = load_script("edge_table")
    assert edge.over_seeds({0: 0.5}) == "0.500 (1 seed)"
    assert edge.over_seeds({0: 0.5, 1: 0.6}) == "0.550 ± 0.071 (2)"
