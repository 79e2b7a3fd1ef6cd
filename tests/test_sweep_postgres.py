"""The sweep across machines, on a real PostgreSQL server: two workers share one study, one is killed
with SIGKILL in the middle of a trial, and the heartbeat fails that trial so the other replaces it.

The server is Debian's `postgresql` package, started on 127.0.0.1 (a free port) in a temporary data
directory (as the `postgres` user when the tests run as root: the server refuses root); the driver is
`psycopg2-binary` (or psycopg 3). Without either, the test is skipped and says which is missing.
The workers are `fwlora sweep` processes whose `train` is a stand-in (two 1-second epochs), so the
test takes well under a minute; benchmarks/sweep_postgres.sh does the same with real training.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from fwlora import sweep
from fwlora.files import read_json
from test_data import write_task

REPO = Path(__file__).resolve().parents[1]
TRIALS = 3
SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}, "rank": {"type": "categorical", "choices": [1, 2]},
         "lambda_fw": None, "batch_size": None,
         "fw_warmup_steps": {"type": "categorical", "choices": [1, 2], "methods": ["fwlora"]}}

# a worker: `fwlora sweep` with train replaced by a stand-in that logs every call and takes ~1 s per epoch
WORKER = r"""
import json, os, sys, time
from pathlib import Path
import fwlora.train
from fwlora.records import RunRecord, Status

def fake_train(cfg, resume=False, overwrite=False, on_epoch_end=None):
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(os.environ["SWEEP_TEST_CALLS"], "a") as f:
        f.write(json.dumps({"study": run_dir.parent.name, "trial": run_dir.name, "pid": os.getpid()}) + "\n")
    history = []
    for epoch in range(1, cfg.epochs + 1):
        time.sleep(1.0)
        value = 0.5 + 0.01 * epoch - abs(cfg.lr - 3e-4)
        history.append({"epoch": epoch, "mcc": value, "accuracy": value})
        if on_epoch_end:
            on_epoch_end(history[-1])
    return RunRecord(status=Status.COMPLETE, task=cfg.task, method=cfg.method, seed=cfg.seed, config=cfg.to_dict(),
                     metric="mcc", final=history[-1], best=max(history, key=lambda h: h["mcc"]), epochs=history,
                     timing={"train_seconds": float(cfg.epochs)})

fwlora.train.train = fake_train
from fwlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _server_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _driver() -> bool:
    """psycopg2 or psycopg 3: `--storage postgresql://...` uses whichever is installed."""
    return any(importlib.util.find_spec(m) is not None for m in ("psycopg2", "psycopg"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 with a database `sweep`; stopped and deleted afterwards."""
    bin_dir = _server_bin()
    if bin_dir is None:
        pytest.skip("needs the PostgreSQL server binaries (Debian: apt-get install postgresql)")
    if not _driver():
        pytest.skip("needs a PostgreSQL driver for SQLAlchemy (pip install psycopg2-binary)")
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="fwlora-pg-")
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the package's system user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = Path(root) / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run(prefix + [str(bin_dir / args[0]), *args[1:]], check=True, capture_output=True, text=True,
                       timeout=120)

    try:
        pg("initdb", "-D", str(data), "-U", "sweep", "--auth=trust", "--no-sync", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(Path(root) / "server.log"), "-w", "-t", "60", "start", "-o",
           f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{root}' -c fsync=off")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {e.stderr or e.stdout}") from None
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "sweep", "sweep")
        yield f"postgresql://sweep@127.0.0.1:{port}/sweep"  # as a user writes it, whichever driver is installed
    finally:
        subprocess.run(prefix + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgres_a_killed_workers_trial_is_failed_by_heartbeat_and_replaced(tmp_path, postgres_url):
    write_task(tmp_path / "glue", "cola", n=24)  # 24 examples, batch 16, 2 epochs: 4 optimizer steps
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    calls = tmp_path / "calls.jsonl"
    calls.touch()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SWEEP_TEST_CALLS": str(calls)}

    def worker(name: str) -> subprocess.Popen:
        # each worker its own output directory, as on two machines; only the database is shared
        command = [sys.executable, "-c", WORKER, "sweep", "--methods", "lora,fwlora", "--trials", str(TRIALS),
                   "--storage", postgres_url, "--heartbeat-seconds", "2", "--grace-seconds", "6", "--pruner", "none",
                   "--space", str(space), "--output-dir", str(tmp_path / name), "--data-dir", str(tmp_path / "glue"),
                   "--task", "cola", "--epochs", "2", "--batch-size", "16"]
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    victim, survivor = worker("machine-a"), worker("machine-b")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and victim.poll() is None:
            if any(json.loads(line)["pid"] == victim.pid for line in calls.read_text().splitlines()):
                break
            time.sleep(0.1)
        assert victim.poll() is None, victim.communicate()[0]
        time.sleep(0.5)  # inside its trial's first 1-second epoch
        victim.send_signal(signal.SIGKILL)
        victim_output = victim.communicate(timeout=30)[0]
        output = survivor.communicate(timeout=150)[0]
    finally:
        for p in (victim, survivor):
            if p.poll() is None:
                p.kill()
    assert victim.returncode == -signal.SIGKILL, victim_output
    assert survivor.returncode == 0, output

    storage = sweep.open_storage(postgres_url, tmp_path).storage
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    keys = [(c["study"], c["trial"]) for c in log]
    assert len(keys) == len(set(keys)), log  # no trial trained twice
    killed = []
    for method in ("lora", "fwlora"):
        study = optuna.load_study(study_name=f"cola-{method}", storage=storage)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == TRIALS, [(t.number, t.state, t.user_attrs) for t in trials]
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)]
        failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]
        for t in failed:
            assert t.user_attrs["worker"]["pid"] == victim.pid and "no heartbeat" in t.user_attrs["fail_reason"]
            killed.append((method, t))
        # every trial that counts was trained exactly once; surplus trials (a lost race) never were
        trained = {c["trial"] for c in log if c["study"] == f"cola-{method}"}
        assert {f"trial{t.number}" for t in complete} <= trained
        assert not {f"trial{t.number}" for t in trials if t.user_attrs.get("surplus")} & trained
    assert len(killed) == 1  # the victim's trial: failed by the heartbeat ...
    method, dead = killed[0]
    assert (f"cola-{method}", f"trial{dead.number}", victim.pid) in {(c["study"], c["trial"], c["pid"]) for c in log}
    study = optuna.load_study(study_name=f"cola-{method}", storage=storage)
    replacement = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number > dead.number
                   and t.user_attrs["worker"]["pid"] == survivor.pid]
    assert replacement  # ... and replaced by the survivor
    assert "sent no heartbeat for over 6 s" in output  # the survivor failed it (whether it had to wait for that depends on timing)
    best = read_json(tmp_path / "machine-b" / "best_params.json")  # the last worker's outputs are complete
    assert {m: best[m]["trials"]["complete"] for m in best} == {"lora": TRIALS, "fwlora": TRIALS}
    assert {m: best[m]["trials"]["failed"] for m in best} == {"lora": int(method == "lora"), "fwlora": int(method == "fwlora")}
