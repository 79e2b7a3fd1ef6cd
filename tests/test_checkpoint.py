"""Checkpoints that survive what users meet: every process gets its own RNG back (two gloo processes), a
checkpoint that cannot be read is named in one line and the previous one is used (the result is still the
uninterrupted run's), with none readable the run asks for --overwrite, and an --output-dir that is a file is
a one-line error."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fwlora import train as train_module
from fwlora.cli import main


# ---- per-process RNG --------------------------------------------------------------------------------------


def _rng_worker(rank: int, world: int, root: str) -> None:
    from safetensors.torch import save_file

    from fwlora.checkpoint import gather_rng_states, restore_rng, rng_tensors

    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    torch.manual_seed(100 + rank)  # each process its own dropout stream, as under DDP
    random.seed(200 + rank)
    states = gather_rng_states(cpu)
    if rank == 0:
        save_file(rng_tensors(states), f"{root}/rng.safetensors")
        Path(f"{root}/python.json").write_text(json.dumps([s["python"] for s in states]))
    torch.distributed.barrier()
    expected = (torch.rand(4).tolist(), random.random())  # what this process draws next
    torch.manual_seed(0)
    random.seed(0)
    python = json.loads(Path(f"{root}/python.json").read_text())
    restore_rng(load_file(f"{root}/rng.safetensors"), python[rank], rank, cpu)
    got = (torch.rand(4).tolist(), random.random())
    Path(f"{root}/rank{rank}.json").write_text(json.dumps({"expected": expected, "got": got}))
    torch.distributed.destroy_process_group()


def test_each_process_gets_its_own_rng_back(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rng_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["got"] == r0["expected"] and r1["got"] == r1["expected"]
    assert r0["expected"] != r1["expected"]  # not rank 0's state on every rank
    saved = load_file(str(tmp_path / "rng.safetensors"))
    assert set(saved) == {"torch/0", "torch/1"}


def test_a_checkpoint_of_the_old_layout_restores_rank_0_s_state():
    """Checkpoints written before per-process states hold `torch` alone: every process takes it."""
    from fwlora.checkpoint import restore_rng

    torch.manual_seed(7)
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.manual_seed(0)
    restore_rng({"torch": state}, None, 1, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


# ---- corrupt checkpoints ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_distributed import sentence_data, tiny_model_dir

    root = tmp_path_factory.mktemp("ckpt")
    return tiny_model_dir(root), sentence_data(root, n=64)


def args(tiny, out: Path, *extra: str) -> list[str]:
    """64 examples at batch 8, 2 epochs: 16 steps; checkpoints every 3 steps."""
    model, data = tiny
    return ["train", "--model", str(model), "--task", "sst2", "--data-dir", str(data), "--method", "fwlora",
            "--rank", "2", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--max-length", "16",
            "--fw-warmup-steps", "4", "--lambda-fw", "5", "--lora-dropout", "0.1", "--report-to", "none",
            "--threads", "1", "--checkpoint-every", "3", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(args(tiny, out)) == 0
    return out


def failed_at_step_8(tiny, out: Path, monkeypatch) -> None:
    """A run that diverges at step 8 (a NaN gradient) after checkpoints at steps 3 and 6: both are kept."""
    original = train_module.Trainer._optimizer_step

    def patched(self):
        if self.global_step + 1 == 8:
            next(p for p in self.params if p.grad is not None).grad.view(-1)[0] = math.nan
        original(self)

    with monkeypatch.context() as m:
        m.setattr(train_module.Trainer, "_optimizer_step", patched)
        assert main(args(tiny, out)) == 1
    step = {d: json.loads((out / d / "progress.json").read_text())["global_step"] for d in ("checkpoint", "checkpoint.old")}
    assert step == {"checkpoint": 6, "checkpoint.old": 3}


def same_result(a: Path, b: Path) -> None:
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    assert rb["status"] == "complete"
    strip = lambda es: [{k: v for k, v in e.items() if "seconds" not in k} for e in es]  # noqa: E731
    assert strip(rb["epochs"]) == strip(ra["epochs"]) and rb["matrices"] == ra["matrices"]
    x, y = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("broken", ["trainable.safetensors", "progress.json"])
def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tiny, tmp_path, monkeypatch, capsys, caplog,
                                                                 reference, broken):
    out = tmp_path / "run"
    failed_at_step_8(tiny, out, monkeypatch)
    path = out / "checkpoint" / broken
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a write cut off half way
    capsys.readouterr()
    assert main(args(tiny, out, "--resume")) == 0
    assert "Traceback" not in capsys.readouterr().err
    named = [r.getMessage() for r in caplog.records if f"checkpoint/{broken} cannot be read" in r.getMessage()]
    assert len(named) == 1 and "\n" not in named[0] and "trying the checkpoint before it" in named[0]
    result = json.loads((out / "result.json").read_text())
    assert any(f"checkpoint/{broken} cannot be read" in n and "resumed from checkpoint.old (step 3)" in n
               for n in result["notes"])
    same_result(reference, out)  # from step 3, deterministically, to the uninterrupted run's end
    assert not (out / "checkpoint").exists() and not (out / "checkpoint.old").exists()
    assert (out / "checkpoint.unreadable" / broken).is_file()  # kept to look at


def test_with_no_readable_checkpoint_the_run_asks_for_overwrite(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    failed_at_step_8(tiny, out, monkeypatch)
    (out / "checkpoint" / "trainable.safetensors").write_bytes(b"not a safetensors file")
    (out / "checkpoint.old" / "progress.json").write_text("{")
    capsys.readouterr()
    assert main(args(tiny, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if "cannot resume" in x)
    assert "checkpoint/trainable.safetensors cannot be read" in line
    assert "checkpoint.old/progress.json cannot be read" in line and "--overwrite" in line
    assert (out / "checkpoint").is_dir() and (out / "checkpoint.old").is_dir()  # nothing thrown away
    assert main(args(tiny, out, "--overwrite")) == 0  # the user says so: a clean start


def test_checkpoints_keep_the_previous_one_and_a_complete_run_drops_both(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    failed_at_step_8(tiny, out, monkeypatch)  # the newest (6) and the one before (3), both readable
    for d in ("checkpoint", "checkpoint.old"):
        for t in load_file(str(out / d / "trainable.safetensors")).values():
            assert torch.isfinite(t).all()
    assert not (out / "checkpoint.tmp").exists()
    assert main(args(tiny, out, "--resume")) == 0
    assert not (out / "checkpoint").exists() and not (out / "checkpoint.old").exists()


@pytest.mark.parametrize("where", ["itself", "parent"])
def test_an_output_dir_that_is_a_file_is_a_one_line_error(tiny, tmp_path, capsys, where):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    out = target if where == "itself" else target / "run"
    assert main(args(tiny, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "FileExistsError" not in err
    assert len([x for x in err.splitlines() if str(target) in x]) == 1
    assert target.read_text() == "mine" and os.path.isfile(target)
