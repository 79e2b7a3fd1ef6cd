"""Nothing lost: interruption and resume reproduce an uninterrupted run exactly, divergence stops with
the step and keeps the last good checkpoint, and a bench records a failing run and goes on. Atomic
results files and the no-unpickling check are in test_safe_files.py."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fwlora import train as train_module
from fwlora.cli import main

CHECKPOINT_FILES = {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", "progress.json"}
METHOD_FILES = {"lora": set(), "fwlora": {"fwlora_state.safetensors"}, "fwrank": {"fwrank_state.safetensors"},
                "adalora": {"adalora_rank_pattern.json"}}  # + adalora_allocator.safetensors while it allocates



@pytest.fixture(scope="module")
def cola(glue_dir) -> Path:
    """The synthetic GLUE-format copy (conftest): a small CoLA-format slice is used."""
    return glue_dir


def args_for(data: Path, out: Path, method: str, batch_size: int = 8, fw_warmup: int = 10, *extra: str) -> list[str]:
    """64 training examples, 2 epochs: 16 optimizer steps at batch 8 (32 at batch 4)."""
    return ["train", "--task", "cola", "--method", method, "--data-dir", str(data), "--output-dir", str(out),
            "--rank", "2", "--train-limit", "64", "--eval-limit", "32", "--max-length", "32", "--epochs", "2",
            "--batch-size", str(batch_size), "--lr", "1e-3", "--lambda-fw", "1.0", "--fw-warmup-steps", str(fw_warmup),
            "--threads", "1", *extra]


def without_timing(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in entries]


def assert_same_run(ref_dir: Path, run_dir: Path) -> None:
    """Final metrics, per-epoch history, per-matrix statistics, adapter tensors and FW-LoRA state: equal."""
    ref, res = (json.loads((d / "result.json").read_text()) for d in (ref_dir, run_dir))
    assert res["status"] == ref["status"] == "complete"
    assert without_timing([res["final"]]) == without_timing([ref["final"]])
    assert without_timing(res["epochs"]) == without_timing(ref["epochs"])
    assert res["matrices"] == ref["matrices"]  # norms, singular values, FW-LoRA F and I, AdaLoRA ranks
    assert res["method_info"] == ref["method_info"]
    assert res["timing"]["optimizer_steps"] == ref["timing"]["optimizer_steps"]
    names = sorted(p.name for p in (ref_dir / "adapter").iterdir() if p.suffix == ".safetensors")
    assert names == sorted(p.name for p in (run_dir / "adapter").iterdir() if p.suffix == ".safetensors")
    for name in names:
        a, b = load_file(str(ref_dir / "adapter" / name)), load_file(str(run_dir / "adapter" / name))
        assert a.keys() == b.keys() and a, name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"
        with safe_open(str(ref_dir / "adapter" / name), "pt") as fa, safe_open(str(run_dir / "adapter" / name), "pt") as fb:
            assert fa.metadata() == fb.metadata()  # FW-LoRA: steps_done, names, config
    assert not (run_dir / "checkpoint").exists()


_REFERENCES: dict[tuple, Path] = {}


def reference(tmp_path_factory, data: Path, method: str, batch_size: int = 8, fw_warmup: int = 10) -> Path:
    """An uninterrupted run (in this process), once per setting."""
    key = (method, batch_size, fw_warmup)
    if key not in _REFERENCES:
        out = tmp_path_factory.mktemp(f"ref-{method}") / "run"
        assert main(args_for(data, out, method, batch_size, fw_warmup)) == 0
        _REFERENCES[key] = out
    return _REFERENCES[key]


def check_checkpoint(run_dir: Path, method: str, step: int, steps_per_epoch: int) -> None:
    ckpt = run_dir / "checkpoint"
    assert CHECKPOINT_FILES | METHOD_FILES[method] <= {p.name for p in ckpt.iterdir()}
    assert not (run_dir / "checkpoint.tmp").exists()
    if (run_dir / "checkpoint.old").exists():  # the one before, kept as a fallback: whole, and older
        assert json.loads((run_dir / "checkpoint.old" / "progress.json").read_text())["global_step"] < step
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["global_step"] == step
    # the data position: whole epochs done, then micro-batches into the current one
    assert progress["epoch"] * steps_per_epoch + progress["batches_done_in_epoch"] == step
    assert len(progress["history"]) == progress["epoch"]
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert "torch/0" in rng  # each process's own state, by rank
    for t in load_file(str(ckpt / "trainable.safetensors")).values():
        assert torch.isfinite(t).all()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "interrupted" and result["step"] == step
    assert not (run_dir / "adapter").exists()


# ---- interruption: a real signal to a real process ---------------------------------------------------


def test_sigint_to_a_training_process_then_resume_equals_the_uninterrupted_run(tmp_path, tmp_path_factory, cola, capsys):
    """fwlora, 32 steps (16 per epoch), FW warm-up 24 steps: SIGINT lands in epoch 2, mid-warm-up."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path = tmp_path / "stderr.log"
    with open(log_path, "w") as log, open(tmp_path / "stdout.log", "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "fwlora", *args_for(cola, out, "fwlora", 4, 24)],
                                stdout=stdout, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 180
            while True:  # wait for the end-of-epoch-1 checkpoint: the process is then in epoch 2
                try:
                    if json.loads((out / "checkpoint" / "progress.json").read_text())["epoch"] >= 1:
                        break
                except (FileNotFoundError, json.JSONDecodeError, KeyError):
                    pass
                assert proc.poll() is None, f"the run ended before it was interrupted:\n{log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no epoch-1 checkpoint after 180 s"
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = log_path.read_text()
    assert rc == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    step = json.loads((out / "result.json").read_text())["step"]
    assert 16 < step < 32, "the signal should land in epoch 2"
    assert f"fwlora: stopped by SIGINT at step {step}; checkpoint saved in {out / 'checkpoint'}; continue with --resume" \
        in stderr
    check_checkpoint(out, "fwlora", step, steps_per_epoch=16)
    if step < 24:  # (practically always) the interruption fell inside FW-LoRA's warm-up
        with safe_open(str(out / "checkpoint" / "fwlora_state.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["steps_done"]) == step

    # without --resume the unfinished run is refused, and left as it is
    assert main(args_for(cola, out, "fwlora", 4, 24)) == 2
    assert "holds an unfinished run of this configuration (interrupted)" in capsys.readouterr().err
    assert (out / "checkpoint" / "progress.json").is_file()

    assert main(args_for(cola, out, "fwlora", 4, 24, "--resume")) == 0
    assert_same_run(reference(tmp_path_factory, cola, "fwlora", 4, 24), out)


# ---- interruption at a chosen step (in this process, deterministic), every method -------------------


def test_sigkill_after_the_resize_then_resume_equals_the_uninterrupted_run(tmp_path, tmp_path_factory, cola):
    """fwrank, 32 steps, K = 6, a checkpoint every 2 steps: SIGKILL (no handler runs) after the resize loses
    only the steps since the last checkpoint; --resume re-applies the allocation before the weights load
    and ends where the uninterrupted run ends."""
    extra = ("--fwrank-warmup-steps", "6", "--fwrank-warmup-rank", "3", "--fwrank-measure-every", "1",
             "--checkpoint-every", "2")
    ref = tmp_path_factory.mktemp("ref-fwrank") / "run"
    assert main(args_for(cola, ref, "fwrank", 4, 10, *extra)) == 0
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "stderr.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fwlora", *args_for(cola, out, "fwrank", 4, 10, *extra)],
                                stdout=subprocess.DEVNULL, stderr=log, env=env)
        deadline = time.monotonic() + 180
        step = 0
        while step < 8:  # a periodic checkpoint past K = 6 (the model is resized), well before step 32
            try:
                step = json.loads((out / "checkpoint" / "progress.json").read_text())["global_step"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            assert proc.poll() is None, f"the run ended before it was killed:\n{(tmp_path / 'stderr.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint past step 8 after 180 s"
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "result.json").exists()
    assert step < 32
    assert main(args_for(cola, out, "fwrank", 4, 10, *extra, "--resume")) == 0
    assert_same_run(ref, out)


def stop_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Send `signum` to this process right after optimizer step `step` (the real handler catches it)."""
    original = train_module.Trainer._optimizer_step

    def patched(self):
        original(self)
        if self.global_step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(train_module.Trainer, "_optimizer_step", patched)


@pytest.mark.parametrize("method, step", [
    ("lora", 8),      # the last step of epoch 1, before its evaluation
    ("adalora", 5),   # during AdaLoRA's budget allocation (tinit 2 .. tfinal 8 of 16 steps)
    ("adalora", 12),  # mid-epoch 2, final phase
    ("fwlora", 5),    # inside FW-LoRA's warm-up (10 steps)
    ("fwlora", 13),   # after the warm-up, with the penalty on
])
def test_sigterm_at_step_then_resume_equals_the_uninterrupted_run(tmp_path, tmp_path_factory, monkeypatch, capsys,
                                                                 cola, method, step):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        stop_at(m, step)
        assert main(args_for(cola, out, method)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert f"fwlora: stopped by SIGTERM at step {step}; checkpoint saved in" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    check_checkpoint(out, method, step, steps_per_epoch=8)
    if method == "fwlora":
        with safe_open(str(out / "checkpoint" / "fwlora_state.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["steps_done"]) == step
    if method == "adalora" and step <= 8:  # its sensitivity EMAs, until the final phase drops them
        assert (out / "checkpoint" / "adalora_allocator.safetensors").is_file()
    assert main(args_for(cola, out, method, 8, 10, "--resume")) == 0
    assert_same_run(reference(tmp_path_factory, cola, method), out)
    resumes = [json.loads((run / "result.json").read_text())["timing"]["resumes"]
               for run in (out, reference(tmp_path_factory, cola, method))]
    assert resumes == [1, 0]  # the record says its time holds a restart
    # resumed on the machine it started on: one boot, its times pair with the reference's
    boot = Path("/proc/sys/kernel/random/boot_id")
    boots = [json.loads((run / "result.json").read_text())["timing"].get("boot_ids")
             for run in (out, reference(tmp_path_factory, cola, method))]
    expected = [boot.read_text().strip()] if boot.is_file() else ["unknown"]
    assert boots == [expected, expected]


# ---- non-finite loss or gradient ---------------------------------------------------------------------


def test_divergence_with_a_huge_lr_exits_1_naming_the_step(tmp_path, capsys, cola):
    out = tmp_path / "run"
    args = args_for(cola, out, "lora")
    args[args.index("--lr") + 1] = "1e6"
    assert main(args) == 1
    err = capsys.readouterr().err
    m = re.search(r"fwlora: training diverged: the loss or gradient became NaN/inf at optimizer step (\d+) "
                  r"\(epoch (\d)\); try a lower --lr\. The last good checkpoint is kept\.", err)
    assert m, err
    assert "Traceback" not in err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "failed" and f"optimizer step {m.group(1)}" in result["error"]
    assert result["step"] >= int(m.group(1))
    if (out / "checkpoint").exists():  # a checkpoint is only ever a good one
        progress = json.loads((out / "checkpoint" / "progress.json").read_text())
        assert progress["global_step"] < int(m.group(1))
        for t in load_file(str(out / "checkpoint" / "trainable.safetensors")).values():
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("what", ["gradient", "loss"])
def test_nan_in_epoch_2_keeps_the_epoch_1_checkpoint(tmp_path, monkeypatch, capsys, cola, what):
    out = tmp_path / "run"
    bad_step = 11  # the third optimizer step of epoch 2 (8 steps per epoch)
    if what == "gradient":
        original = train_module.Trainer._optimizer_step

        def patched(self):
            if self.global_step + 1 == bad_step:
                next(p for p in self.params if p.grad is not None).grad.view(-1)[0] = math.nan
            original(self)

        monkeypatch.setattr(train_module.Trainer, "_optimizer_step", patched)
    else:
        original = torch.nn.functional.cross_entropy
        calls = []

        def nan_loss(*a, **k):
            calls.append(1)
            loss = original(*a, **k)
            return loss * math.nan if len(calls) == bad_step + 1 else loss  # call 1: the untimed warm-up step

        monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_loss)
    assert main(args_for(cola, out, "lora")) == 1
    err = capsys.readouterr().err
    assert f"became NaN/inf at optimizer step {bad_step} (epoch 2)" in err and "Traceback" not in err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "failed" and f"step {bad_step}" in result["error"]
    assert [e["epoch"] for e in result["epochs"]] == [1]
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert (progress["epoch"], progress["global_step"], progress["batches_done_in_epoch"]) == (1, 8, 0)
    for name in ("trainable.safetensors", "rng.safetensors"):
        for t in load_file(str(out / "checkpoint" / name)).values():
            assert not t.is_floating_point() or torch.isfinite(t).all()
    optimizer = torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)
    for state in optimizer["state"].values():
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


@pytest.mark.parametrize("method", ["fwlora", "fwrank"])
def test_a_nan_just_before_the_end_of_the_warmup_is_divergence_not_a_user_error(tmp_path, monkeypatch, capsys, cola,
                                                                                 method):
    """A NaN loss at step 9 of a 10-step warm-up (8 steps per epoch: past the loop's epoch-end check) reaches
    the method's statistic, which raises at step 10 before the loop's own check of that step: still exit 1,
    result.json 'failed' with the step, never the exit 2 of a user mistake."""
    original = torch.nn.functional.cross_entropy
    calls = []

    def nan_loss(*a, **k):
        calls.append(1)
        loss = original(*a, **k)
        return loss * math.nan if len(calls) == 9 + 1 else loss  # call 1: the untimed warm-up step

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_loss)
    out = tmp_path / "run"
    extra = ("--fw-measure-every", "1", "--fwrank-warmup-steps", "10", "--fwrank-measure-every", "1")
    assert main(args_for(cola, out, method, 8, 10, *extra)) == 1
    err = capsys.readouterr().err
    assert "fwlora: training diverged:" in err and "non-finite" in err and "Traceback" not in err
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "failed" and result["step"] == 9 and "non-finite" in result["error"]


# ---- a bench with a failing run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def failing_bench(tmp_path_factory, cola):
    """fwlora first (its warm-up is longer than the run: invalid), then lora (fine)."""
    out = tmp_path_factory.mktemp("bench") / "b"
    sets = ["epochs=1", "train_limit=16", "eval_limit=16", "max_length=16", "batch_size=8", "fw_warmup_steps=50",
            "threads=1"]
    argv = ["bench", "--tasks", "cola", "--methods", "fwlora,lora", "--ranks", "1", "--seeds", "1",
            "--data-dir", str(cola), "--output-dir", str(out), "--no-report"]
    for s in sets:
        argv += ["--set", s]
    return out, argv


def test_bench_records_a_failed_run_and_goes_on(failing_bench, capsys):
    out, argv = failing_bench
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed: cola/r1/fwlora/seed0" in err and "Traceback" not in err
    failed = json.loads((out / "cola" / "r1" / "fwlora" / "seed0" / "result.json").read_text())
    assert failed["status"] == "failed"
    assert "fw-warmup-steps = 50 >= the run's 2 optimizer steps" in failed["error"]
    assert (failed["task"], failed["method"], failed["seed"]) == ("cola", "fwlora", 0)
    done = out / "cola" / "r1" / "lora" / "seed0" / "result.json"
    assert json.loads(done.read_text())["status"] == "complete"
    bench = json.loads((out / "bench.json").read_text())
    assert bench["runs"] == ["cola/r1/fwlora/seed0", "cola/r1/lora/seed0"]
    # again, failed runs left alone: nothing runs, the complete run is untouched, the failure still reported
    before = done.read_bytes()
    assert main(argv + ["--no-retry-failed"]) == 1
    assert "1 run(s) failed: cola/r1/fwlora/seed0" in capsys.readouterr().err
    assert done.read_bytes() == before


def test_report_marks_the_failed_bench_cell(failing_bench, tmp_path):
    from fwlora import report

    out, argv = failing_bench
    if not (out / "bench.json").is_file():
        assert main(argv) == 1
    report.write_report([out], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "1 complete, 1 failed" in text, text[:3000]
    assert re.search(r"FW-LoRA seed 0 failed: UserError: fw-warmup-steps = 50", text), text[:3000]
