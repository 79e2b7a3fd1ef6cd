"""A bench spread over workers: each worker's share of the grid, claims that no two workers hold at once
(a stale one taken over, a live one skipped and never recorded as failed), a report over a directory two
worker processes shared equal to a serial bench's, and under torchrun only rank 0 writing run files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwlora import bench
from fwlora.bench import Outcome, groups, plan, run_bench
from fwlora.claims import Claims, Holder, Worker, is_stale, read_claim
from fwlora.cli.flags import parse_sets
from fwlora.errors import UserError
from fwlora.records import CLAIM_FILE, RunRecord, Status, read_result, write_config, write_result

HERE = Path(__file__).resolve().parent
COMPLETE, FAILED, HELD, OTHER = Outcome.COMPLETE, Outcome.FAILED, Outcome.HELD, Outcome.OTHER


def grid(out: Path, seeds: int = 3, **train) -> list[bench.Cell]:
    return plan({"source": "test"}, out, {"tasks": "sst2", "methods": "lora,fwlora", "ranks": "1", "seeds": seeds},
                 {"model": "minilm", **train})


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_claim(run_dir: Path, **fields) -> None:
    now = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "worker": "9/10", "token": "theirs",
              "heartbeat": now, "since": now, **fields}
    (run_dir / CLAIM_FILE).write_text(json.dumps(holder))


# ---- shares and claims (no training) ----------------------------------------------------------------------


def test_worker_index_from_the_flag_and_from_launchers():
    assert Worker.parse("1/4") == Worker(1, 4) and str(Worker(1, 4)) == "1/4"
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(UserError):
            Worker.parse(bad)
    assert Worker.from_environment({}) == Worker(0, 1)
    assert Worker.from_environment({"FWLORA_WORKER": "2/3", "SLURM_ARRAY_TASK_ID": "0"}) == Worker(2, 3)
    # sbatch --array=1-4: task ids 1..4 are workers 0..3; --array=0-12:4 (ids 0, 4, 8, 12) workers 0..3
    assert Worker.from_environment({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
                                    "SLURM_ARRAY_TASK_COUNT": "4"}) == Worker(2, 4)
    assert Worker.from_environment({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "0",
                                    "SLURM_ARRAY_TASK_STEP": "4", "SLURM_ARRAY_TASK_COUNT": "4"}) == Worker(2, 4)
    with pytest.raises(UserError):  # --array=1,5,6: task 6 is not the third of three evenly spaced tasks
        Worker.from_environment({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "1",
                                 "SLURM_ARRAY_TASK_COUNT": "3"})


def test_workers_are_dealt_whole_groups_round_robin_in_seed_order(tmp_path):
    cells = plan({"source": "test"}, tmp_path, {"tasks": "sst2,cola", "methods": "lora,fwlora", "ranks": "1,2",
                                               "seeds": 2}, {"model": "minilm"})
    dealt = groups(cells)
    assert len(dealt) == 8 and all(len(g) == 2 for g in dealt)
    share = {w: [c.key for i, g in enumerate(dealt) if Worker(w, 3).owns(i) for c in g] for w in range(3)}
    # by hand: groups in plan order (seed, task, rank), every third one from the worker's index
    # 0 s0/sst2/r1, 1 s0/sst2/r2, 2 s0/cola/r1, 3 s0/cola/r2, 4 s1/sst2/r1, 5 s1/sst2/r2, 6 s1/cola/r1, 7 s1/cola/r2;
    # within a group the methods in the preset's order turned by the seed's index (seed 1: fwlora first)
    assert share[1] == ["sst2/r2/lora/seed0", "sst2/r2/fwlora/seed0", "sst2/r1/fwlora/seed1", "sst2/r1/lora/seed1",
                        "cola/r2/fwlora/seed1", "cola/r2/lora/seed1"]
    assert share[2] == ["cola/r1/lora/seed0", "cola/r1/fwlora/seed0", "sst2/r2/fwlora/seed1", "sst2/r2/lora/seed1"]
    assert sorted(k for keys in share.values() for k in keys) == sorted(c.key for c in cells)


def test_no_method_always_runs_first_in_its_group(tmp_path):
    """Seed k's groups start with the k-th method (mod the count): over 3 seeds each of 3 methods leads once."""
    cells = plan({"source": "test"}, tmp_path, {"tasks": "sst2", "methods": "lora,fwlora,adalora", "ranks": "1",
                                               "seeds": 4}, {"model": "minilm"})
    orders = [[c.method for c in g] for g in groups(cells)]
    assert orders == [["lora", "fwlora", "adalora"], ["fwlora", "adalora", "lora"], ["adalora", "lora", "fwlora"],
                      ["lora", "fwlora", "adalora"]]


def test_a_claim_is_exclusive_until_it_is_stale(tmp_path):
    run = tmp_path / "run"
    with Claims(Worker(0, 2)) as mine, Claims(Worker(1, 2)) as theirs:
        assert mine.acquire(run) is None
        held = theirs.acquire(run)
        assert held is not None and held.worker == "0/2" and held.pid == os.getpid()
        first = read_claim(run).heartbeat
        time.sleep(0.01)
        mine.beat()
        assert read_claim(run).heartbeat > first and read_claim(run).worker == "0/2"
        mine.release(run)
        assert not (run / CLAIM_FILE).exists() and theirs.acquire(run) is None
        theirs.release(run)
        write_claim(run, pid=dead_pid())  # a worker killed on this host
        assert mine.acquire(run) is None and read_claim(run).worker == "0/2"
        mine.release(run)
        write_claim(run, host="elsewhere", pid=1, heartbeat=time.time() - 700)  # silent for longer than 600 s
        assert mine.acquire(run) is None
        mine.release(run)
        write_claim(run, host="elsewhere", pid=1, heartbeat=time.time() - 300)  # another host, alive
        assert mine.acquire(run).host == "elsewhere"
        (run / CLAIM_FILE).write_text("")  # being written by its creator: held, by its file time
        assert mine.acquire(run).worker == "?"
        assert not [p for p in run.iterdir() if p.name.endswith(".stale")]
    # a claim taken over from a worker whose heartbeat stalled: it stops refreshing it and never removes it
    (run / CLAIM_FILE).unlink()
    slow = Claims(Worker(0, 2), stale_after=600)
    assert slow.acquire(run) is None
    write_claim(run, token="new owner")
    slow.beat()
    slow.release(run)
    assert read_claim(run).token == "new owner"
    assert is_stale(Holder("elsewhere", 1, "0/1", "t", heartbeat=100.0, since=0.0), 600, now=701.0)
    assert not is_stale(Holder("elsewhere", 1, "0/1", "t", heartbeat=100.0, since=0.0), 600, now=699.0)


# ---- the scheduler with a stand-in for train(): which runs it starts, and how ---------------------------------


@pytest.fixture
def fake_train(monkeypatch):
    """Records (run, resume, overwrite) and that the run's whole group is claimed by this bench while it
    trains; writes a complete result. `fake_train.hooks[key]` runs before the run `key` is recorded."""
    def train(cfg, resume=False, overwrite=False):
        run_dir = Path(cfg.output_dir)
        key = "/".join(run_dir.parts[-4:])
        group = [d for d in run_dir.parent.parent.glob(f"*/{run_dir.name}")]
        train.claimed.append(sorted((d.parent.name, getattr(read_claim(d), "worker", None)) for d in group))
        train.calls.append((key, resume, overwrite))
        train.hooks.get(key, lambda: None)()
        write_result(run_dir, RunRecord(status=Status.COMPLETE, task=cfg.task, method=cfg.method, seed=cfg.seed,
                                        config=cfg.to_dict()))
    train.calls, train.claimed, train.hooks = [], [], {}
    monkeypatch.setattr(bench, "train", train)
    return train


def test_a_live_claim_is_skipped_never_recorded_and_a_stale_one_taken_over(tmp_path, fake_train):
    cells = grid(tmp_path)
    by = {c.key: Path(c.config.output_dir) for c in cells}
    other = Claims(Worker(1, 2))  # a live worker holding seed 0's group
    assert other.acquire(by["sst2/r1/lora/seed0"]) is None and other.acquire(by["sst2/r1/fwlora/seed0"]) is None
    stale = next(c for c in cells if c.key == "sst2/r1/lora/seed1")  # started by a worker since killed
    write_config(by[stale.key], stale.config.to_dict(), {})
    write_claim(by[stale.key], pid=dead_pid())
    failed = next(c for c in cells if c.key == "sst2/r1/lora/seed2")  # failed in an earlier call: retried
    write_result(by[failed.key], RunRecord(status=Status.FAILED, task="sst2", method="lora", seed=2, config={}))

    def another_worker_fails_a_run():  # recorded during this call, by someone else: not retried here
        write_result(by["sst2/r1/fwlora/seed2"], RunRecord(status=Status.FAILED, task="sst2", method="fwlora", seed=2,
                                                           config={}))
    fake_train.hooks["sst2/r1/lora/seed1"] = another_worker_fails_a_run
    statuses = run_bench(cells, tmp_path)
    assert fake_train.calls == [("sst2/r1/fwlora/seed1", False, False), ("sst2/r1/lora/seed1", True, False),
                                ("sst2/r1/lora/seed2", False, True)]  # seed 1's group turned: fwlora first
    assert statuses == {"sst2/r1/lora/seed0": HELD, "sst2/r1/fwlora/seed0": HELD,
                        "sst2/r1/lora/seed1": COMPLETE, "sst2/r1/fwlora/seed1": COMPLETE,
                        "sst2/r1/lora/seed2": COMPLETE, "sst2/r1/fwlora/seed2": FAILED}
    # the group was claimed whole by this bench (worker 0/1) before its first run
    assert fake_train.claimed[0] == [("fwlora", "0/1"), ("lora", "0/1")]
    for key in ("sst2/r1/lora/seed0", "sst2/r1/fwlora/seed0"):  # held: untouched, nothing recorded
        assert read_result(by[key]) is None and read_claim(by[key]).worker == "1/2"
        assert sorted(p.name for p in by[key].iterdir()) == [CLAIM_FILE]
    assert [c.key for c in cells if (by[c.key] / CLAIM_FILE).exists()] == ["sst2/r1/lora/seed0", "sst2/r1/fwlora/seed0"]


def test_held_runs_are_come_back_to_at_the_end_and_shares_are_kept(tmp_path, fake_train):
    cells = grid(tmp_path)
    by = {c.key: Path(c.config.output_dir) for c in cells}
    other = Claims(Worker(1, 2))
    assert other.acquire(by["sst2/r1/lora/seed0"]) is None and other.acquire(by["sst2/r1/fwlora/seed0"]) is None
    fake_train.hooks["sst2/r1/fwlora/seed2"] = lambda: [other.release(by[k]) for k in list(by)[:2]]
    assert set(run_bench(cells, tmp_path).values()) == {COMPLETE}
    assert [k for k, _, _ in fake_train.calls] == [c.key for c in cells[2:] + cells[:2]]
    # worker 1/3 without stealing runs only its own group (seed 1); the rest is another worker's
    fake_train.calls.clear()
    statuses = run_bench(grid(tmp_path / "b"), tmp_path / "b", worker=Worker(1, 3), steal=False)
    assert [k for k, _, _ in fake_train.calls] == ["sst2/r1/fwlora/seed1", "sst2/r1/lora/seed1"]  # turned
    assert [s for s in statuses.values()] == [OTHER, OTHER, COMPLETE, COMPLETE, OTHER, OTHER]


def test_a_silent_claim_from_another_host_is_waited_for_then_taken_over(tmp_path, fake_train):
    """A worker killed on another host: its heartbeat stops; the bench waits until the claim is stale (here
    2 s, heartbeats every 0.5 s) instead of leaving its runs undone."""
    cells = grid(tmp_path, seeds=1)
    for c in cells:
        write_claim(Path(c.config.output_dir), host="elsewhere", pid=1, heartbeat=time.time() - 1.2)
    assert set(run_bench(cells, tmp_path, stale_after=2.0).values()) == {COMPLETE}
    assert fake_train.calls == [("sst2/r1/lora/seed0", False, False), ("sst2/r1/fwlora/seed0", False, False)]
    assert not list(tmp_path.rglob(CLAIM_FILE)) and not list(tmp_path.rglob("*.stale"))


# ---- real runs --------------------------------------------------------------------------------------------

TINY = ["model=minilm", "train_limit=32", "eval_limit=32", "epochs=1", "max_length=32", "report_to=none",
        "batch_size=8", "fw_warmup_steps=2", "threads=1"]


def bench_command(out: Path, data: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "fwlora", "bench", "--tasks", "sst2", "--methods", "lora,fwlora", "--ranks", "1",
           "--seeds", "2", "--data-dir", str(data), "--output-dir", str(out), *extra]
    for s in TINY:
        cmd += ["--set", s]
    return cmd


def report_numbers(out: Path) -> dict:
    """What the report's summary.json says that timing cannot change: per cell and column the final and best
    metric over seeds, the run counts; and each run's final metrics (result.json, but its seconds)."""
    [protocol] = json.loads((out / "report" / "summary.json").read_text())["protocols"]
    cells = {(c["task"], c["budget_label"]): {m: (st["final"], st["best"]) for m, st in c["methods"].items()}
             for c in protocol["cells"]}
    runs = {}
    for path in out.glob("*/*/*/*/result.json"):
        final = json.loads(path.read_text())["final"]
        final.pop("train_seconds")
        runs[path.parent.relative_to(out).as_posix()] = final
    return {"cells": cells, "counts": protocol["counts"], "runs": runs}


def test_two_worker_processes_give_the_serial_bench_s_report(tmp_path, glue_dir):
    from fwlora.cli.app import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(bench_command(tmp_path / "shared", glue_dir), env={**env, "FWLORA_WORKER": f"{i}/2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    assert main(bench_command(tmp_path / "serial", glue_dir)[3:]) == 0  # meanwhile, the same grid in this process
    logs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-3000:] for _, err in logs)
    # every run trained exactly once over the two workers (each logs "[k/n] <run>" as it starts one)
    started = [line.split("] ")[1] for _, err in logs for line in err.splitlines() if "fwlora.bench: [" in line]
    assert sorted(started) == sorted(["sst2/r1/lora/seed0", "sst2/r1/fwlora/seed0", "sst2/r1/lora/seed1",
                                      "sst2/r1/fwlora/seed1"]), logs
    assert any("report: " in out for out, _ in logs)  # the worker that finished last wrote it
    assert not list((tmp_path / "shared").rglob(CLAIM_FILE))
    serial, shared = report_numbers(tmp_path / "serial"), report_numbers(tmp_path / "shared")
    assert shared["counts"]["complete"] == 4 and len(shared["runs"]) == 4 and len(shared["cells"]) == 1
    assert shared == serial


def test_under_torchrun_only_rank_0_writes_run_files(tmp_path, glue_dir):
    """Two gloo processes train one bench: both train every run, rank 0 alone claims and writes."""
    from test_distributed import tiny_model_dir

    model = tiny_model_dir(tmp_path)
    out = tmp_path / "b"
    old = out / "sst2" / "r1" / "lora" / "seed0"  # a failed run from an earlier call: overwritten once
    argv = bench_command(out, glue_dir, "--no-report")[3:]
    argv[argv.index("model=minilm")] = f"model={model}"
    argv += ["--methods", "lora", "--seeds", "1"]
    sets = parse_sets([f"model={model}", *TINY[1:]])
    cells = plan({"source": "test"}, out, {"tasks": "sst2", "methods": "lora", "ranks": "1", "seeds": 1},
                 {**sets, "data_dir": str(glue_dir)})
    write_config(old, cells[0].config.to_dict(), {})
    write_result(old, RunRecord(status=Status.FAILED, task="sst2", method="lora", seed=0, config={}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + os.getpid() % 200), str(HERE / "dist_bench.py"), str(tmp_path / "writes"), *argv]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    writes = {r: json.loads((tmp_path / "writes" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert writes[0]["ddp_at_destroy"] == [0]  # nothing held the group past its destroy (rank 1: the line below)
    assert writes[1] == {"files": [], "claims": [], "cleared": [], "trained": ["sst2/r1/lora/seed0"],
                         "ddp_at_destroy": [0]}
    names = [Path(p).relative_to(out).as_posix() for p in writes[0]["files"]]
    assert {"bench.json", "sst2/r1/lora/seed0/config.json", "sst2/r1/lora/seed0/result.json"} <= set(names)
    assert writes[0]["claims"] == ["sst2/r1/lora/seed0"] and writes[0]["cleared"] == ["sst2/r1/lora/seed0"]
    assert writes[0]["trained"] == ["sst2/r1/lora/seed0"]
    assert read_result(old).status == Status.COMPLETE and not (old / CLAIM_FILE).exists()
