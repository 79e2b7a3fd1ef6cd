"""Scale-out: two data-parallel CPU processes (gloo) give the single-process Fisher scores, identical on
every rank; accumulation through the engine gives the unsplit batch's scores; bf16 autocast keeps the
Fisher in fp32 and finite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def tiny_model_dir(root: Path) -> Path:
    """A tiny random BERT (no dropout) with the bundled MiniLM tokenizer, saved like a hub model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fwlora.models import resolve_backbone

    path = root / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sentence_data(root: Path, n: int = 64) -> Path:
    words = ["good", "bad", "film", "plot", "great", "dull", "actors", "story", "not", "very"]
    gen = torch.Generator().manual_seed(0)
    folder = root / "glue" / "sst2"
    folder.mkdir(parents=True)
    for split, count in (("train", n), ("validation", 32)):
        rows = ["sentence\tlabel"]
        for i in range(count):
            k = int(torch.randint(3, 9, (1,), generator=gen))
            rows.append(" ".join(words[j] for j in torch.randint(0, 10, (k,), generator=gen).tolist()) + f"\t{i % 2}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root / "glue"


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return tiny_model_dir(root), sentence_data(root), root


def run_worker(root: Path, name: str, config: dict, nproc: int = 1) -> Path:
    cfg_path = root / f"{name}.json"
    cfg_path.write_text(json.dumps(config))
    out = root / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(HERE / "dist_worker.py"), str(cfg_path), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), str(HERE / "dist_worker.py"), str(cfg_path), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def base_config(model: Path, data: Path, **overrides) -> dict:
    return {"model": str(model), "task": "sst2", "data_dir": str(data), "method": "fwlora", "rank": 2,
            "epochs": 2, "batch_size": 16, "lr": 1e-2, "fw_warmup_steps": 4, "max_length": 16, "eval_batch_size": 16,
            "lambda_fw": 10.0, "seed": 0, **overrides}


@pytest.mark.parametrize("method", ["fwlora", "lora", "adalora"])
def test_two_processes_match_one_process(setup_dirs, method):
    model, data, root = setup_dirs
    config = base_config(model, data, method=method)
    single = run_worker(root, f"single-{method}", config)
    double = run_worker(root, f"ddp-{method}", config, nproc=2)
    one = load_file(str(single / "rank0.safetensors"))
    r0, r1 = load_file(str(double / "rank0.safetensors")), load_file(str(double / "rank1.safetensors"))
    assert json.loads((double / "rank0.json").read_text())["world"] == 2
    for key in r0:  # identical on every rank, exactly: DDP averages gradients, FW-LoRA averages its pieces
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0)
    if method == "fwlora":
        torch.testing.assert_close(r0["fisher"], one["fisher"], rtol=1e-5, atol=0)
        torch.testing.assert_close(r0["importance"], one["importance"], rtol=1e-5, atol=0)
    for key in one:  # and the same training as one process on the same global batches
        if key.startswith("adapter/"):
            torch.testing.assert_close(r0[key], one[key], rtol=1e-3, atol=1e-5)


def test_accumulation_through_the_engine_matches_the_unsplit_batch(setup_dirs):
    model, data, root = setup_dirs
    whole = run_worker(root, "acc1", base_config(model, data, epochs=1, fw_warmup_steps=3))
    split = run_worker(root, "acc2", base_config(model, data, epochs=1, fw_warmup_steps=3, grad_accum=2))
    a, b = load_file(str(whole / "rank0.safetensors")), load_file(str(split / "rank0.safetensors"))
    torch.testing.assert_close(b["fisher"], a["fisher"], rtol=1e-5, atol=0)
    for key in a:
        if key.startswith("adapter/"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_keeps_fisher_fp32_and_finite(setup_dirs):
    model, data, root = setup_dirs
    out = run_worker(root, "bf16", base_config(model, data, mixed_precision="bf16"))
    ref = load_file(str(run_worker(root, "fp32", base_config(model, data)) / "rank0.safetensors"))
    got = load_file(str(out / "rank0.safetensors"))
    assert got["fisher"].dtype == torch.float64 and torch.isfinite(got["fisher"]).all()
    assert (got["fisher"] > 0).all()
    # bf16 has ~3 significant digits: the scores agree with fp32's roughly, and rank the matrices alike
    from scipy.stats import spearmanr

    assert spearmanr(got["fisher"].numpy(), ref["fisher"].numpy()).statistic > 0.9
    history = json.loads((out / "rank0.json").read_text())["history"]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["penalty"] > 0  # the penalty is computed (in fp32) under autocast


def test_torchrun_runs_the_cli(setup_dirs):
    """`torchrun --nproc_per_node 2 -m fwlora train ...`: one result, written once, by two processes."""
    model, data, root = setup_dirs
    out = root / "cli-run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(30500 + os.getpid() % 1000), "-m", "fwlora", "train", "--model", str(model), "--task", "sst2",
           "--data-dir", str(data), "--method", "fwlora", "--rank", "2", "--epochs", "2", "--batch-size", "16",
           "--fw-warmup-steps", "4", "--max-length", "16", "--output-dir", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "complete" and result["processes"] == 2
    assert result["timing"]["optimizer_steps"] == 8  # 64 examples / global batch 16 x 2 epochs
    assert sum(r["importance"] for r in result["matrices"]) == pytest.approx(1.0)


def test_a_killed_process_ends_the_torchrun_run_and_resume_finishes_it(setup_dirs, tmp_path):
    """One of two gloo processes killed with SIGKILL mid-run: the whole run ends (torchrun names the dead
    process), no result is written, and `--resume` from the last periodic checkpoint reaches the same final
    metrics and adapter as an uninterrupted run."""
    import signal
    import time

    import psutil
    from safetensors.torch import load_file as load

    model, _, _ = setup_dirs
    data = sentence_data(tmp_path, n=1024)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    def command(out: Path, port: int, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "fwlora", "train", "--model", str(model), "--task", "sst2", "--data-dir", str(data),
                "--method", "fwlora", "--rank", "2", "--epochs", "2", "--batch-size", "16", "--fw-warmup-steps", "6",
                "--max-length", "16", "--checkpoint-every", "5", "--output-dir", str(out), *extra]

    port = 31600 + os.getpid() % 1000
    reference = tmp_path / "straight"
    done = subprocess.run(command(reference, port), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, port + 1), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = killed / "checkpoint" / "progress.json"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a periodic checkpoint past the warm-up, well before the end (128 steps)
        try:
            if 10 <= json.loads(progress.read_text())["global_step"] < 100:
                break
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=240)  # the survivor must not hang on its dead peer
    assert proc.returncode != 0
    assert "SIGKILL" in stderr or "Signal 9" in stderr or "exitcode  : -9" in stderr, stderr[-3000:]
    assert not (killed / "result.json").exists()

    resumed = subprocess.run(command(killed, port + 2, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, res = (json.loads((d / "result.json").read_text()) for d in (reference, killed))
    assert res["status"] == "complete" and res["timing"]["optimizer_steps"] == ref["timing"]["optimizer_steps"] == 128
    assert [{k: v for k, v in e.items() if "seconds" not in k} for e in res["epochs"]] == \
        [{k: v for k, v in e.items() if "seconds" not in k} for e in ref["epochs"]]
    a, b = (load(str(d / "adapter" / "adapter_model.safetensors")) for d in (reference, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("launched", [False, True])
def test_leaving_under_a_launcher_skips_the_interpreter_teardown_and_keeps_output(tmp_path, launched):
    """Under a launcher the command line exits without finalising the interpreter (where a gloo thread can abort
    a rank that finished), after flushing what it printed and logged; alone, it exits as Python does."""
    script = ("import atexit, logging, sys\n"
              "from pathlib import Path\n"
              "from fwlora.files import leave_process\n"
              "atexit.register(lambda: Path(sys.argv[1]).write_text('teardown ran'))\n"
              "logging.basicConfig(filename=sys.argv[2], level=logging.INFO)\n"
              "logging.info('logged before leaving')\n"
              "print('printed before leaving', end='')\n"  # a pipe: block-buffered until flushed
              "leave_process(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if launched:
        env["WORLD_SIZE"] = "2"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "teardown"), str(tmp_path / "log")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "printed before leaving"
    assert "logged before leaving" in (tmp_path / "log").read_text()
    assert (tmp_path / "teardown").exists() is not launched
