"""Synthetic run directories for the report's tests: every number in them is chosen here, so that a test
can check the report against a hand computation (no training, no network)."""

from __future__ import annotations

import math
from pathlib import Path

from fwlora import analysis, report
from fwlora.files import write_json
from fwlora.records import RunRecord, Status, write_config, write_result

LAYERS = 2
KINDS = analysis.KIND_ORDER
T_975_DF3 = 3.182446305284263  # Student t, 97.5 % quantile, 3 degrees of freedom (printed tables: 3.182)
T_975_DF2 = 4.302652729911275  # ... 2 degrees of freedom (tables: 4.303)


# ---- synthetic runs --------------------------------------------------------------------------------


def importance_of(j: int, layer: int) -> float:
    """Unnormalised importance: rises with the matrix kind's index (so it is not uniform)."""
    return 1.0 + 3.0 * j + layer


def matrices(method: str, seed: int, shrink_low: bool = True) -> list[dict]:
    raw = {(layer, j): importance_of(j, layer) for layer in range(LAYERS) for j in range(len(KINDS))}
    total = sum(raw.values())
    rows = []
    for (layer, j), v in raw.items():
        imp = v / total
        norm = 1.0 + 0.1 * j + 0.05 * layer + 0.01 * seed  # LoRA's
        if method == "fwlora":
            norm *= (0.5 + 5 * imp) if shrink_low else 0.5  # shrinks the low-importance matrices more
        row = {"name": f"encoder.layer.{layer}.{KINDS[j]}", "layer": layer, "kind": KINDS[j], "shape": [8, 8],
               "fro_norm": norm, "effective_rank": 1.5 + 0.05 * j, "numerical_rank": 2,
               "singular_values": [0.8 * norm, 0.6 * norm]}
        if method == "fwlora":
            row.update(fisher=v * 1e-4, importance=imp)
        if method == "adalora":
            row["adalora_rank"] = j % 4
        rows.append(row)
    return rows


# Release 1's TrainConfig.to_dict() with its defaults: every run's config held every method's settings
# (the reader must not need today's TrainConfig to read yesterday's runs).
RELEASE1_CONFIG = {
    "task": "cola", "method": "lora", "model": "minilm", "head": "auto", "budget": None, "rank": None,
    "target_modules": None, "data_dir": None, "train_limit": None, "eval_limit": None, "max_length": 128, "epochs": 3,
    "lr": 2e-4, "batch_size": 32, "grad_accum": 1, "weight_decay": 0.0, "warmup_ratio": 0.06, "max_grad_norm": 1.0,
    "seed": 0, "lora_alpha": None, "lora_dropout": 0.0, "lambda_fw": 1e-4, "fw_warmup_steps": 500, "fw_beta": 0.98,
    "fw_estimator": "exact", "fw_sketch_size": 8, "fw_measure_every": 1, "fw_normalization": "sum",
    "allow_late_penalty": False, "adalora_alpha": None, "adalora_orth_reg": 0.1, "adalora_tinit": 0.12,
    "adalora_tfinal": 0.48, "adalora_delta": 0.0015, "adalora_beta1": 0.85, "adalora_beta2": 0.85,
    "mixed_precision": "no", "eval_batch_size": 128, "threads": None, "output_dir": "runs/train", "log_every": 10,
}


def config(task: str, method: str, seed: int, rank: int, out: Path, **overrides) -> dict:
    unknown = set(overrides) - set(RELEASE1_CONFIG)
    assert not unknown, unknown
    return {**RELEASE1_CONFIG, "task": task, "method": method, "seed": seed, "rank": rank, "output_dir": str(out),
            **overrides}


def result(task: str, method: str, seed: int, rank: int, out: Path, final: float, train: float = 100.0,
           step: float = 0.1, best: float | None = None, shrink_low: bool = True, **overrides) -> dict:
    metric = "mcc" if task == "cola" else "accuracy"
    cfg = config(task, method, seed, rank, out, **overrides)
    n = cfg["epochs"]
    epochs = []
    for e in range(1, n + 1):
        value = final - 0.02 * (n - e)
        if best is not None and e == max(1, n - 1):
            value = best
        epochs.append({"epoch": e, "step": 10 * e, "loss": 0.5, "accuracy": value, "mcc": value,
                       "train_seconds": train * e / n})
    timing = {"train_seconds": train, "eval_seconds": 1.0, "optimizer_steps": 10 * n, "examples_per_second": 10.0,
              "step_seconds_median": step, "peak_memory": {"kind": "process_peak_rss", "bytes": 1}, "load_seconds": 1.0}
    if method == "fwlora":
        timing.update(fw_warmup_step_seconds_median=step * 1.3, fw_after_warmup_step_seconds_median=step,
                      fw_warmup_seconds=5.0)
    adalora = None
    if method == "adalora":
        adalora = {"init_r": math.ceil(1.5 * rank), "target_r": rank, "lora_alpha": 4.0 * math.ceil(1.5 * rank),
                   "total_step": 10 * n, "tinit": 1, "tfinal": 5, "deltaT": 1, "orth_reg_weight": 0.1,
                   "beta1": 0.85, "beta2": 0.85, "final_total_rank": rank * LAYERS * len(KINDS)}
    per_rank = 16 * LAYERS * len(KINDS)
    return {
        "status": "complete", "task": task, "method": method, "seed": seed, "metric": metric,
        "final": epochs[-1], "best": max(epochs, key=lambda h: h[metric]), "epochs": epochs,
        "budget": {"rank": rank, "adapter_params": rank * per_rank, "backbone_params": 100_000, "head_params": 770,
                   "percent": 100.0 * rank * per_rank / 100_000, "requested_percent": None,
                   "trainable_params": rank * per_rank + 770 + (50 if method == "adalora" else 0),
                   "adapter_trainable_params": rank * per_rank + (50 if method == "adalora" else 0),
                   "head": "mean", "lora_alpha": 2.0 * rank, "targets": list(KINDS)},
        "adalora": adalora, "timing": timing, "matrices": matrices(method, seed, shrink_low),
        "data": {"source": "synthetic", "train_examples": 100, "eval_examples": 50, "steps_per_epoch": 10,
                 "total_steps": 10 * n},
        "notes": [], "env": {"python": "3.11", "platform": "test", "packages": {"fwlora": "0.1.0", "torch": "2.x"},
                             "git_commit": "abc123", "git_dirty": False, "torch_threads": 1, "cuda_device": None,
                             "command": "fwlora train ..."},
        "config": cfg,
    }


def write_run(bench: Path, task: str, label: str, method: str, seed: int, **kw) -> Path:
    run = bench / task / label / method / f"seed{seed}"
    rank = int(label[1:])
    write_json(run / "config.json", {"config": config(task, method, seed, rank, run,
                                                      **{k: v for k, v in kw.items() if k in RELEASE1_CONFIG}),
                                     "env": {}})
    write_json(run / "result.json", result(task, method, seed, rank, run, **kw))
    return run


def write_failed(bench: Path, task: str, label: str, method: str, seed: int) -> Path:
    run = bench / task / label / method / f"seed{seed}"
    write_json(run / "result.json", {"status": "failed", "error": "RuntimeError: boom", "task": task, "method": method,
                                     "seed": seed, "config": config(task, method, seed, int(label[1:]), run)})
    return run


def write_running(bench: Path, task: str, label: str, method: str, seed: int) -> Path:
    run = bench / task / label / method / f"seed{seed}"
    write_json(run / "config.json", {"config": config(task, method, seed, int(label[1:]), run), "env": {}})
    return run


def write_bench(bench: Path, tasks=("cola",), labels=("r1", "r2"), methods=("lora", "adalora", "fwlora"), seeds=3,
                preset: str = "preset quick") -> None:
    runs = [f"{t}/{lb}/{m}/seed{s}" for s in range(seeds) for t in tasks for lb in labels for m in methods]
    write_json(bench / "bench.json", {"command": f"fwlora bench --output-dir {bench}", "preset": {"source": preset},
                                      "set": {"epochs": 3}, "runs": runs})


# Final metrics chosen by hand: {(label, method): [seed0, seed1, seed2]}
FINAL = {
    ("r1", "lora"): [0.40, 0.42, 0.44],
    ("r1", "adalora"): [0.41, 0.45, None],  # seed 2 failed
    ("r1", "fwlora"): [0.43, 0.44, 0.47],
    ("r2", "lora"): [0.50, 0.52, 0.51],
    ("r2", "adalora"): [0.52, 0.50, 0.55],
    ("r2", "fwlora"): [0.53, 0.55, "running"],
}
TRAIN = {"lora": [100.0, 200.0, 100.0], "adalora": [120.0, 220.0, 115.0], "fwlora": [110.0, 202.0, 150.0]}
STEP = {"lora": [0.10, 0.20, 0.10], "adalora": [0.112, 0.224, 0.11], "fwlora": [0.101, 0.203, 0.13]}


def make_bench(root: Path) -> Path:
    """The release-1 bench of FINAL: LoRA, AdaLoRA and FW-LoRA at r1 and r2 over three seeds, one failed, one
    still running."""
    write_bench(root)
    for (label, method), values in FINAL.items():
        for seed, v in enumerate(values):
            if v is None:
                write_failed(root, "cola", label, method, seed)
            elif v == "running":
                write_running(root, "cola", label, method, seed)
            else:
                write_run(root, "cola", label, method, seed, final=v, train=TRAIN[method][seed],
                          step=STEP[method][seed])
    return root


def cell(summary: report.ProtocolReport, label: str) -> report.Cell:
    return next(c for c in summary.cells if c.budget_label == label)


# a schema-2 config holds the shared settings and the run's own method's settings only
SHARED2 = {k: v for k, v in RELEASE1_CONFIG.items()
           if not k.startswith(("fw_", "adalora_")) and k not in ("lambda_fw", "allow_late_penalty")}
OWN2 = {"fwlora": {"lambda_fw": 1e-4, "fw_warmup_steps": 500, "fw_beta": 0.98, "fw_estimator": "exact",
                   "fw_sketch_size": 8, "fw_measure_every": None, "fw_normalization": "sum", "fw_gamma": 1.0,
                   "allow_late_penalty": False}}
LLAMA_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def write_run2(root: Path, task: str, budget: str, method: str, seed: int, values: list[float], *, label: str | None = None,
               metric: str = "accuracy", higher: bool = True, train: float = 100.0, step: float = 0.1,
               majority: dict | None = None, params: tuple | None = None, timing: dict | None = None,
               matrices: list | None = None, method_info: dict | None = None, boot_id: str | None = None,
               **own) -> Path:
    """A schema-2 run directory written by fwlora.records, with metric `values` per epoch."""
    run = root / task / budget / (label or method) / f"seed{seed}"
    rank = int(budget[1:])
    cfg = {**SHARED2, **OWN2.get(method, {}), **own, "task": task, "method": method, "seed": seed, "rank": rank,
           "label": label, "output_dir": str(run)}
    epochs = [{"epoch": e, "step": 10 * e, "loss": 0.5, metric: v, "train_seconds": train * e / len(values)}
              for e, v in enumerate(values, start=1)]
    budget_info = {"rank": rank, "adapter_params": 100 * rank, "backbone_params": 100_000, "head_params": 770,
                   "percent": 0.1 * rank, "adapter_trainable_params": 100 * rank, "lora_alpha": 2.0 * rank}
    if params:
        budget_info.update(zip(("trained_adapter_params_initial", "trained_adapter_params_final",
                                "trained_adapter_params_mean"), params))
    record = RunRecord(status=Status.COMPLETE, task=task, method=method, seed=seed, config=cfg, metric=metric,
                       higher_is_better=higher, final=epochs[-1],
                       best=(max if higher else min)(epochs, key=lambda e: e[metric]), epochs=epochs,
                       budget=budget_info, method_info=method_info or {},
                       timing={"train_seconds": train, "step_seconds_median": step, **(timing or {})},
                       matrices=matrices or [], data={"source": "synthetic", "train_examples": 100, "eval_examples": 50,
                                                      "majority": majority},
                       env={"command": "fwlora train ...", "boot_id": boot_id})
    write_config(run, cfg, {})
    write_result(run, record)
    return run


def llama_matrices(column: str, value) -> list[dict]:
    """Per-matrix rows with LLaMA-style names: layers 0-1, seven kinds; `value(layer, j)` fills `column`."""
    rows = []
    for layer in range(2):
        for j, kind in enumerate(LLAMA_KINDS):
            rows.append({"name": f"model.layers.{layer}.{kind}", "layer": layer, "kind": kind, "fro_norm": 1.0 + j,
                         "effective_rank": 1.0, column: value(layer, j)})
    return rows


def verdict_starting(lines: list[str], start: str) -> str:
    (line,) = [v for v in lines if v.startswith(start)]
    return line
