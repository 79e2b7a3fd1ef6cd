"""benchmarks/gpu_check.py on the CPU (--device cpu, tiny sizes): the correctness check passes against the float64
reference and fails against a wrong one, the overhead ratios are the runs' own times, a stage that raises leaves
the finished stages' records, and without a GPU the script says how to run the dry check."""

from __future__ import annotations

import json

import torch
from test_benchmarks import load_script


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_correctness_passes_against_float64_and_the_overhead_ratios_are_the_runs_own(tmp_path, glue_dir):
    gpu_check = load_script("gpu_check")
    out = tmp_path / "check.jsonl"
    argv = ["--device", "cpu", "--stages", "correctness,overhead", "--methods", "lora,fwrank", "--dtypes", "fp32,bf16",
            "--pairs", "1", "--data-dir", str(glue_dir), "--output", str(out), "--work-dir", str(tmp_path)]
    assert gpu_check.main(argv) == 0
    got = records(out)
    checks = [r for r in got if r["stage"] == "correctness" and r["kind"] == "result"]
    assert [(r["method"], r["dtype"]) for r in checks] == [("lora", "fp32"), ("lora", "bf16"), ("fwrank", "fp32"),
                                                          ("fwrank", "bf16")]
    assert all(r["passed"] and r["loss_max_rel"] <= r["tolerance"]["loss_max_rel"] for r in checks)
    assert checks[2]["resized_after_steps"] == [3]  # fwrank's resize is inside the compared steps
    assert all(r["device"].startswith("cpu") and r["env"]["git_commit"] and r["env"]["packages"]["torch"] for r in got)
    # the reference's first loss is the plain backbone's (LoRA starts at dW = 0), computed here without PEFT
    ds = gpu_check.ds
    from transformers import set_seed

    set_seed(0)
    backbone = ds.tiny_backbone().double()
    batch = ds.check_batches(ds.CheckSpec())[0]
    with torch.no_grad():
        plain = float(backbone(**batch).loss)
    assert abs(checks[0]["reference_losses"][0] - plain) < 1e-12
    # overhead: one process per run, the ratio is fwrank's train_seconds over the same round's LoRA's
    runs = {r["method"]: r for r in got if r["stage"] == "overhead" and r["kind"] == "run"}
    assert set(runs) == {"lora", "fwrank"} and "--fwrank-warmup-steps 0.5" in runs["fwrank"]["command"]
    summary = next(r for r in got if r["stage"] == "overhead" and r["kind"] == "stage")
    expected = runs["fwrank"]["train_seconds"] / runs["lora"]["train_seconds"]
    assert summary["ratio_to_reference"]["fwrank"]["ratios"] == [expected]
    assert summary["ratio_to_reference"]["fwrank"]["median_ratio"] == expected


def test_correctness_fails_against_a_reference_with_a_wrong_learning_rate(tmp_path):
    gpu_check = load_script("gpu_check")
    out = tmp_path / "wrong.jsonl"
    argv = ["--device", "cpu", "--stages", "correctness", "--methods", "lora,fwlora", "--dtypes", "fp32",
            "--reference-lr-factor", "1.05", "--output", str(out)]
    assert gpu_check.main(argv) == 1
    checks = [r for r in records(out) if r["kind"] == "result"]
    assert len(checks) == 2 and not any(r["passed"] for r in checks)
    assert all("error" not in r and r["loss_max_rel"] > 100 * r["tolerance"]["loss_max_rel"] for r in checks)
    assert checks[0]["reference"]["lr"] == 1.05 * checks[0]["spec"]["lr"]
    stage = next(r for r in records(out) if r["kind"] == "stage")
    assert stage["failed"] == ["correctness lora fp32", "correctness fwlora fp32"]


def test_a_stage_that_raises_keeps_the_finished_stages_records_and_the_next_stage_runs(tmp_path, monkeypatch):
    gpu_check = load_script("gpu_check")

    def broken(check):
        raise RuntimeError("out of memory, say")

    monkeypatch.setitem(gpu_check.RUNNERS, "memory", broken)
    out = tmp_path / "partial.jsonl"
    argv = ["--device", "cpu", "--stages", "correctness,memory,mfu", "--methods", "lora", "--dtypes", "fp32",
            "--output", str(out)]
    assert gpu_check.main(argv) == 1
    got = records(out)
    assert [(r["stage"], r["kind"], r.get("status")) for r in got] == [
        ("correctness", "result", None), ("correctness", "stage", "done"), ("memory", "stage", "error"),
        ("mfu", "result", None), ("mfu", "stage", "done")]
    assert got[0]["passed"] and "out of memory, say" in got[2]["error"]
    # the 6N estimate by hand for the tiny BERT at rank 2: per layer q, k, v, o 32x32, 32->64 and 64->32, LoRA
    # r (d_in + d_out) on each; the pooler 32x32 and the classifier 32x2 (PEFT's idle originals not counted)
    layer = 4 * 32 * 32 + 2 * 32 * 64 + 2 * (4 * 64 + 2 * 96)
    n = 2 * layer + 32 * 32 + 32 * 2
    tokens = 8 * 16
    mfu = got[3]
    assert mfu["flops_per_step"]["six_n"] == (6 * n + 12 * 2 * 16 * 32) * tokens
    achieved = mfu["mfu_six_n"] * mfu["peak"]["tflops"] * 1e12 * mfu["step_seconds"]
    assert abs(achieved - mfu["flops_per_step"]["six_n"]) < 1
    assert abs(mfu["tokens_per_second"] * mfu["step_seconds"] - tokens) < 1e-6


def test_without_a_gpu_it_says_how_to_run_the_dry_check(monkeypatch, capsys, tmp_path):
    gpu_check = load_script("gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no GPU" in err and "--device cpu" in err
    assert not (tmp_path / "none.jsonl").exists()
