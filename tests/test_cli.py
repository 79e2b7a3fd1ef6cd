"""Bad arguments through `fwlora ...`: exit code 2 and one clear line on stderr, fast, no traceback; and
the run-directory rules (another configuration is refused unless --overwrite, an unfinished run of the
same configuration needs --resume)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data import write_task

from fwlora.cli import main



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("glue"), "cola", n=32)


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    """A run of 2 optimizer steps on 16 examples (a few seconds on one CPU core)."""
    return ["train", "--task", "cola", "--data-dir", str(data), "--output-dir", str(out), "--rank", "1",
            "--train-limit", "16", "--eval-limit", "16", "--max-length", "16", "--epochs", "1", "--batch-size", "8",
            "--threads", "1", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("fwlora: error: ")]
    assert len(errors) == 1, err
    return errors[0].removeprefix("fwlora: error: ")


@pytest.mark.parametrize("extra, pattern", [
    (["--task", "colaa"], r"^unknown task 'colaa'; known tasks: cola, sst2"),
    (["--task", "stsb"], r"stsb is a regression task"),
    (["--method", "nosuch"], r"^method = 'nosuch': unknown method; use one of lora, adalora, fwlora, fwrank, widecut, "),
    (["--lambda-fw=-0.5"], r"^lambda-fw = -0\.5: must be a finite number >= 0$"),
    (["--fw-beta", "0"], r"^fw-beta = 0\.0: must lie strictly between 0 and 1$"),
    (["--fw-beta", "1"], r"^fw-beta = 1\.0: must lie strictly between 0 and 1$"),
    (["--fw-beta", "1.5"], r"^fw-beta = 1\.5"),
    (["--epochs", "0"], r"^epochs = 0: must be >= 1$"),
    (["--budget", "0.2"], r"^give --budget or --rank, not both$"),
])
def test_bad_argument_exits_2_with_one_line(tmp_path, capsys, data, extra, pattern):
    out = tmp_path / "run"
    assert main(tiny(data, out, *extra)) == 2
    assert re.search(pattern, error_line(capsys))
    assert not out.exists()


def test_budget_below_rank_1_names_the_smallest_budget(tmp_path, capsys, data):
    args = tiny(data, tmp_path / "run")
    i = args.index("--rank")
    args[i:i + 2] = ["--budget", "0.0001"]
    assert main(args) == 2
    message = error_line(capsys)
    assert "budget 0.0001 % is below rank 1 on this model" in message
    smallest = float(re.search(r"the smallest budget possible is ([0-9.]+) %", message).group(1))
    assert 0.0001 < smallest < 1


def test_unknown_model_offline_is_one_clear_message_fast(tmp_path, capsys, data, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(tiny(data, tmp_path / "run", "--model", "no-such-org/no-such-model-xyz")) == 2
    assert time.perf_counter() - start < 15  # no 25 s wait on an unreachable hub
    message = error_line(capsys)
    assert message.startswith("could not load model 'no-such-org/no-such-model-xyz'")
    assert "--model minilm" in message


def test_unknown_preset_exits_2(tmp_path, capsys):
    assert main(["bench", "--preset", "no-such-preset", "--output-dir", str(tmp_path / "b")]) == 2
    assert error_line(capsys).startswith("unknown preset 'no-such-preset'; known presets:")
    assert main(["bench", "--preset", str(tmp_path / "missing.yaml"), "--output-dir", str(tmp_path / "b")]) == 2
    assert "missing.yaml" in error_line(capsys)


def test_unknown_method_in_a_bench_grid_exits_2(tmp_path, capsys, data):
    args = ["bench", "--tasks", "cola", "--methods", "lora,nosuch", "--ranks", "1", "--seeds", "1",
            "--data-dir", str(data), "--output-dir", str(tmp_path / "b"), "--no-report"]
    assert main(args) == 2
    assert error_line(capsys).startswith("method = 'nosuch': unknown method; use one of lora, adalora, fwlora, fwrank, ")


def test_unknown_task_in_a_bench_grid_exits_2_before_any_run(tmp_path, capsys, data):
    out = tmp_path / "b"
    args = ["bench", "--tasks", "cola,colaa", "--methods", "lora", "--ranks", "1", "--seeds", "1",
            "--data-dir", str(data), "--output-dir", str(out), "--no-report"]
    assert main(args) == 2
    assert error_line(capsys).startswith("unknown task 'colaa'; known tasks: cola")
    assert not out.exists()


@pytest.mark.parametrize("argv", [["train", "--epochs", "two"], ["train", "--no-such-flag"], ["frobnicate"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_fw_warmup_beyond_the_run_is_refused_or_allowed_with_a_note(tmp_path, capsys, caplog, data):
    out = tmp_path / "run"
    late = ["--method", "fwlora", "--fw-warmup-steps", "50"]
    assert main(tiny(data, out, *late)) == 2
    message = error_line(capsys)
    assert "fw-warmup-steps = 50 >= the run's 2 optimizer steps" in message and "--allow-late-penalty" in message
    assert main(tiny(data, out, *late, "--allow-late-penalty")) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "complete"
    assert any("fw-warmup-steps = 50 >= the run's 2 optimizer steps" in n for n in result["notes"])
    assert any("fw-warmup-steps = 50" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_output_dir_rules(tmp_path, capsys, data):
    out = tmp_path / "run"
    assert main(tiny(data, out)) == 0
    capsys.readouterr()
    # another configuration: refused, and the finished run is untouched
    before = (out / "result.json").read_bytes()
    assert main(tiny(data, out, "--lr", "1e-3")) == 2
    message = error_line(capsys)
    assert f"{out} holds a run with a different configuration (lr: 0.0002 -> 0.001)" in message
    assert "--overwrite" in message
    assert (out / "result.json").read_bytes() == before
    # the same configuration, complete: nothing to do without --overwrite
    assert main(tiny(data, out)) == 2
    assert "already holds this run, complete" in error_line(capsys)
    # settings that do not change the result may differ
    assert main(tiny(data, out, "--log-every", "3")) == 2
    assert "already holds this run, complete" in error_line(capsys)
    # --overwrite replaces it
    assert main(tiny(data, out, "--lr", "1e-3", "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 1e-3
    capsys.readouterr()
    # an unfinished run of the same configuration (config.json, no result) needs --resume
    (out / "result.json").unlink()
    assert main(tiny(data, out, "--lr", "1e-3")) == 2
    message = error_line(capsys)
    assert "holds an unfinished run of this configuration (running)" in message and "--resume" in message
    assert main(tiny(data, out, "--lr", "1e-3", "--resume")) == 0  # no checkpoint: starts from the beginning
    assert json.loads((out / "result.json").read_text())["status"] == "complete"


def test_non_empty_directory_without_a_run_is_refused(tmp_path, capsys, data):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(tiny(data, out)) == 2
    assert "is not empty and holds no fwlora run" in error_line(capsys)
    assert (out / "notes.txt").read_text() == "keep me"


def test_subprocess_bad_data_exits_2_without_traceback(tmp_path):
    glue = write_task(tmp_path / "glue", "cola", train="sentence\tlabel\nfine\t1\nbroken\tmaybe\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fwlora", "train", "--task", "cola", "--data-dir", str(glue),
                           "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"fwlora: error: {glue / 'cola' / 'train.tsv'}:3: label 'maybe' is not an integer"]


def test_output_piped_into_a_reader_that_stops_is_no_traceback(tmp_path, glue_dir):
    """`fwlora bench --dry-run ... | head -1`: the reader closes the pipe; fwlora ends quietly (141)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fwlora", "bench", "--tasks", "cola,sst2", "--methods", "lora,fwlora,fwrank",
           "--ranks", "1,2,4", "--seeds", "300", "--data-dir", str(glue_dir), "--output-dir", str(tmp_path / "b"),
           "--dry-run"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout.readline().startswith("cola/r1/lora/seed0")
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in stderr and proc.returncode in (0, 141)


def test_a_warmup_given_as_a_fraction_of_the_run_on_the_command_line(tmp_path, data):
    out = tmp_path / "run"
    assert main(tiny(data, out, "--method", "fwlora", "--fw-warmup-steps", "0.5", "--epochs", "2",
                     "--report-to", "none")) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["config"]["fw_warmup_steps"] == 0.5 and record["method_info"]["warmup_steps"] == 2  # of 4 steps
    assert main(tiny(data, tmp_path / "late", "--method", "fwrank", "--fwrank-warmup-steps", "0.99")) == 2
