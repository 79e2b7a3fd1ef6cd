"""Is fwlora right on a GPU, and what does it cost there? Run this when a GPU is lent (never run on one yet; about
8 minutes on an H200 by estimate, most of it the overhead runs' process starts):

    make mpnet                                   # once: MPNet-base from its packages (probes and the CoLA cell)
    python benchmarks/gpu_check.py --device cuda --data-dir ../shared/glue \
        --overhead-methods adalora,fwlora,fwrank,widecut
    git add results/gpu-check/                   # the record: <device>-<date>.jsonl

`--stages correctness --dtypes fp32 --reference-lr-factor 1.05` shows the check failing (a reference 5 % off).

Stages (--stages, in this order; each optional):
  correctness  every registered method, a few steps on a tiny random 2-layer BERT in fp32 (TF32 off), bf16
               autocast and fp16 autocast with a gradient scaler on the device, against the same steps from the
               same seed on the CPU in float64 (benchmarks/device_steps.py): the loss trajectory's and the
               adapter's (dW of every matrix, the head) largest differences, pass or fail per method x dtype.
  overhead     each method's training time against LoRA's, one process per run (`fwlora train`), rounds of
               LoRA then every method (A B C .. A B C ..): the ratio to the same round's LoRA, and the median.
  memory       peak memory of a short run of each method on --model (torch.cuda.max_memory_allocated, reset).
  mfu          tokens/s and the share of the card's peak (benchmarks/throughput.py's table) by the 6N estimate,
               by the frozen-backbone estimate and by FlopCounterMode's count (device_steps.flop_estimates).
  resize       for the methods that change their adapter mid-run: that step's time against a normal step's.
  cola         the seed's CoLA cell on MPNet-base: `fwlora bench --preset mpnet-cola`, seed 0, LoRA (--cola-methods).
Every result is appended to --output (JSON lines: device, dtype, versions, git commit) as it comes; a stage that
raises is recorded and the next one runs. Exit 1 if a correctness check failed or a stage raised.

Without a GPU: `--device cpu` runs every stage on the CPU with tiny sizes (the tests do; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import device_steps as ds  # noqa: E402
from throughput import cpu_peak_gflops, gpu_peak_tflops  # noqa: E402

from fwlora import methods, models  # noqa: E402
from fwlora.records import is_run_dir, read_result  # noqa: E402
from fwlora.rundir import environment  # noqa: E402

STAGES = ("correctness", "overhead", "memory", "mfu", "resize", "cola")
MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # --run-dtype -> fwlora train --mixed-precision


class Check:
    """One invocation: its settings, where it writes, what it has measured so far. (A plain class: the tests
    load this script without registering it in sys.modules, which a dataclass here would need.)"""

    def __init__(self, args: argparse.Namespace, device: torch.device, device_name: str, output: Path,
                 env: dict[str, Any]):
        self.args, self.device, self.device_name, self.output, self.env = args, device, device_name, output, env
        self.probes: dict[str, ds.Probe] = {}
        self.backbone: Callable[[], torch.nn.Module] | None = None  # the probes' backbone, loaded on first use
        self.failed: list[str] = []

    def write(self, stage: str, kind: str, **payload: Any) -> dict[str, Any]:
        """Append one record (flushed and synced: a crash later keeps it)."""
        record = {"stage": stage, "kind": kind, "device": self.device_name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  **payload, "env": self.env}
        with open(self.output, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    @property
    def methods(self) -> list[str]:
        return self.args.methods.split(",") if self.args.methods else methods.names()

    def subprocess_env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        if self.device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        elif self.device.index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.device.index)
        return env


def say(line: str) -> None:
    print(line, flush=True)


# ---- correctness ---------------------------------------------------------------------------------------------

def correctness(c: Check) -> None:
    spec = ds.CheckSpec(steps=c.args.steps)
    reference_spec = replace(spec, lr=spec.lr * c.args.reference_lr_factor)
    reference_info = {"device": "cpu", "dtype": "float64", "lr": reference_spec.lr}
    for method in c.methods:
        try:
            reference = ds.trajectory(method, ds.PRECISIONS["fp64"], torch.device("cpu"), reference_spec)
        except Exception as e:  # noqa: BLE001 - recorded, the other methods go on
            reference, error = None, f"reference: {type(e).__name__}: {e}"
        for dtype in c.args.dtypes.split(","):
            if reference is not None:
                try:
                    run = ds.trajectory(method, ds.PRECISIONS[dtype], c.device, spec)
                    result = ds.compare(run, reference, ds.TOLERANCES[dtype])
                except Exception as e:  # noqa: BLE001
                    result = {"passed": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            else:
                result = {"passed": False, "error": error}
            c.write("correctness", "result", method=method, dtype=dtype, spec=asdict(spec), reference=reference_info,
                    **result)
            if not result["passed"]:
                c.failed.append(f"correctness {method} {dtype}")
            say(f"correctness {method:>8} {dtype}: {'pass' if result['passed'] else 'FAIL'}  {ds.describe(result)}")
    c.write("correctness", "stage", status="done", failed=[f for f in c.failed if f.startswith("correctness")])


# ---- overhead: one process per run ------------------------------------------------------------------------------

def train_once(c: Check, method: str, run_dir: Path) -> dict[str, Any]:
    a = c.args
    cmd = [sys.executable, "-m", "fwlora", "train", "--method", method, "--task", "cola", "--model", a.train_model,
           "--rank", str(a.rank), "--train-limit", str(a.train_limit), "--eval-limit", str(a.eval_limit),
           "--epochs", "1", "--batch-size", str(a.batch_size), "--max-length", str(a.length), "--seed", "0",
           "--mixed-precision", MIXED[a.run_dtype], "--report-to", "none", "--output-dir", str(run_dir), "--overwrite"]
    cmd += ["--data-dir", a.data_dir] if a.data_dir else []
    cmd += ["--threads", str(torch.get_num_threads())] if c.device.type == "cpu" else []
    for key, value in ds.short_run_settings(methods.get(method)).items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=c.subprocess_env(), timeout=a.run_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"fwlora train --method {method} exited {done.returncode}: {done.stderr[-2000:]}")
    record = read_result(run_dir)
    return {"train_seconds": record.train_seconds, "timing": record.timing.to_dict(), "metric": record.metric,
            "final": record.final, "command": " ".join(cmd[1:])}


def overhead(c: Check) -> None:
    reference = methods.reference_name()
    chosen = c.args.overhead_methods.split(",") if c.args.overhead_methods else c.methods
    order = [reference] + [m for m in chosen if m != reference]
    ratios: dict[str, list[float]] = {m: [] for m in order[1:]}
    step_ratios: dict[str, list[float]] = {m: [] for m in order[1:]}  # median step: no start-up, no resize
    peaks: dict[str, list[Any]] = {m: [] for m in order}
    with tempfile.TemporaryDirectory(dir=c.args.work_dir) as tmp:
        for round_ in range(c.args.pairs):
            seconds: dict[str, float] = {}
            step: dict[str, float] = {}
            for method in order:
                try:
                    run = train_once(c, method, Path(tmp) / f"{method}-{round_}")
                except Exception as e:  # noqa: BLE001 - recorded; this round's ratio for it is lost
                    c.write("overhead", "run", method=method, round=round_, error=f"{type(e).__name__}: {e}")
                    c.failed.append(f"overhead {method} round {round_}")
                    say(f"overhead round {round_} {method}: FAILED {e}")
                    continue
                seconds[method] = run["train_seconds"]
                step[method] = run["timing"].get("step_seconds_median")
                peaks[method].append(run["timing"].get("peak_memory"))
                c.write("overhead", "run", method=method, round=round_, dtype=c.args.run_dtype, **run)
                say(f"overhead round {round_} {method}: {run['train_seconds']:.2f} s")
            for method in ratios:
                if method in seconds and reference in seconds:
                    ratios[method].append(seconds[method] / seconds[reference])
                    if step[method] and step[reference]:
                        step_ratios[method].append(step[method] / step[reference])
    summary = {m: {"ratios": r, "median_ratio": statistics.median(r) if r else None, "step_ratios": step_ratios[m],
                   "median_step_ratio": statistics.median(step_ratios[m]) if step_ratios[m] else None}
               for m, r in ratios.items()}
    c.write("overhead", "stage", status="done", reference=reference, dtype=c.args.run_dtype,
            model=c.args.train_model, rounds=c.args.pairs, ratio_to_reference=summary, peak_memory_per_run=peaks,
            note="train_seconds of `fwlora train`, one process per run; each ratio is against the same round's "
                 "reference run, which ran first in its round")
    for m, s in summary.items():
        say(f"overhead {m} / {reference}: median {s['median_ratio']} over {len(s['ratios'])} rounds")


# ---- probes: memory, mfu, resize ---------------------------------------------------------------------------------

def probe_backbone(c: Check) -> Callable[[], torch.nn.Module]:
    if c.args.model == "tiny":
        return ds.tiny_backbone
    base, _ = models.load_backbone(c.args.model, 2, models.default_head(c.args.model))
    return lambda: copy.deepcopy(base)  # loaded once; every method starts from the same head


def get_probe(c: Check, method: str) -> ds.Probe:
    if method not in c.probes:
        if not c.probes:
            c.backbone = probe_backbone(c)
        a = c.args
        c.probes[method] = ds.probe(method, ds.PRECISIONS[a.run_dtype], c.device, c.backbone, a.probe_steps,
                                    a.batch_size, a.length, a.rank, lr=1e-4)
    return c.probes[method]


def for_each_method(c: Check, stage: str, measure: Callable[[ds.Probe], dict[str, Any] | None]) -> None:
    for method in c.methods:
        try:
            values = measure(get_probe(c, method))
        except Exception as e:  # noqa: BLE001
            c.write(stage, "result", method=method, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            c.failed.append(f"{stage} {method}")
            say(f"{stage} {method}: FAILED {e}")
            continue
        if values is not None:
            c.write(stage, "result", method=method, dtype=c.args.run_dtype, model=c.args.model, **values)
            say(f"{stage} {method}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float)))
    c.write(stage, "stage", status="done", dtype=c.args.run_dtype, model=c.args.model)


def memory(c: Check) -> None:
    for_each_method(c, "memory", lambda p: {"peak_memory": p.peak_memory, "peak_gib": p.peak_memory["bytes"] / 2**30,
                                            "batch_size": c.args.batch_size, "length": c.args.length})


def peak_tflops(c: Check) -> dict[str, Any] | None:
    if c.args.peak_tflops:
        return {"tflops": c.args.peak_tflops, "assumes": "--peak-tflops"}
    if c.device.type == "cpu":
        cpu = cpu_peak_gflops(torch.bfloat16 if c.args.run_dtype == "bf16" else torch.float32)
        return {"tflops": cpu["gflops"] / 1000, "assumes": cpu["assumes"]}
    return gpu_peak_tflops(c.device_name, c.args.run_dtype)  # the probes' fp32 runs with TF32 off


def mfu(c: Check) -> None:
    peak = peak_tflops(c)

    def measure(p: ds.Probe) -> dict[str, Any]:
        seconds = p.normal_step_seconds()
        est = ds.flop_estimates(p)
        out = {"step_seconds": seconds, "tokens_per_second": p.tokens_per_step / seconds,
               "flops_per_step": {"six_n": est["six_n"], "frozen_backbone": est["frozen_backbone"],
                                  "counted": p.counted_flops_per_step},
               "estimate": est["estimate"], "peak": peak or "unknown for this device: pass --peak-tflops"}
        if peak:
            for key, flops in out["flops_per_step"].items():
                out[f"mfu_{key}"] = flops / seconds / (peak["tflops"] * 1e12)
        return out

    for_each_method(c, "mfu", measure)


def resize(c: Check) -> None:
    def measure(p: ds.Probe) -> dict[str, Any] | None:
        if not p.changed:
            return None
        normal = p.normal_step_seconds()
        hooks = statistics.median(t for i, t in enumerate(p.hook_seconds) if i >= p.skip and i not in p.changed)
        return {"after_steps": p.changed, "resize_step_seconds": [p.step_seconds[i] for i in p.changed],
                "resize_hook_seconds": [p.hook_seconds[i] for i in p.changed], "normal_step_seconds": normal,
                "normal_hook_seconds": hooks, "ratio": max(p.step_seconds[i] for i in p.changed) / normal,
                "note": "the resize step also closes the warm-up's statistic; hook = after_optimizer_step + "
                        "refresh_optimizer"}

    for_each_method(c, "resize", measure)


# ---- the seed's CoLA cell ----------------------------------------------------------------------------------------

def cola(c: Check) -> None:
    a = c.args
    out = Path(a.work_dir or tempfile.gettempdir()) / f"gpu-check-cola-{os.getpid()}"
    cmd = [sys.executable, "-m", "fwlora", "bench", "--preset", a.cola_preset, "--methods", a.cola_methods,
           "--seeds", "1", "--output-dir", str(out), "--no-report"] + (["--data-dir", a.data_dir] if a.data_dir else [])
    tiny = ["model=minilm", "train_limit=64", "eval_limit=64", "epochs=1", "max_length=32"] + [
        f"{k}={v}" for m in a.cola_methods.split(",") for k, v in ds.short_run_settings(methods.get(m)).items()]
    for item in a.cola_set or (tiny if c.device.type == "cpu" else []):
        cmd += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=c.subprocess_env(), timeout=a.cola_timeout)
    say(done.stdout[-3000:])
    for run_dir in sorted({p.parent for p in out.rglob("result.json")}):
        record = read_result(run_dir) if is_run_dir(run_dir) else None
        if record is None:
            continue
        rel = run_dir.relative_to(out)
        committed = REPO / "results" / a.cola_preset / "records" / rel
        cpu = read_result(committed) if (committed / "result.json").is_file() else None
        c.write("cola", "result", path=str(rel), method=record.method, status=str(record.status),
                dtype=record.config.get("mixed_precision"), metric=record.metric, final=record.final,
                timing=record.timing.to_dict(), run_env=record.env, committed_cpu=None if cpu is None else {
                    "path": str(committed.relative_to(REPO)), "final": cpu.final, "timing": cpu.timing.to_dict()})
    if done.returncode != 0:
        raise RuntimeError(f"fwlora bench exited {done.returncode}: {done.stderr[-2000:]}")
    c.write("cola", "stage", status="done", command=" ".join(cmd[1:]), seconds=time.perf_counter() - start,
            output_dir=str(out))


RUNNERS: dict[str, Callable[[Check], None]] = {"correctness": correctness, "overhead": overhead, "memory": memory,
                                               "mfu": mfu, "resize": resize, "cola": cola}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cuda, cuda:N or cpu (cpu: the dry check with tiny sizes); default cuda if present")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated, from " + ", ".join(STAGES))
    p.add_argument("--methods", help="comma-separated registered methods (default: all)")
    p.add_argument("--output", help="JSON lines, appended (default results/gpu-check/<device>-<date>.jsonl)")
    p.add_argument("--data-dir", default=os.environ.get("FWLORA_DATA_DIR"), help="GLUE directory (overhead, cola)")
    p.add_argument("--work-dir", help="where the runs of overhead and cola go (default: a temporary directory)")
    g = p.add_argument_group("correctness")
    g.add_argument("--dtypes", default="fp32,bf16,fp16", help="from " + ", ".join(ds.TOLERANCES))
    g.add_argument("--steps", type=int, default=8, help="optimizer steps (the warm-up ends half-way)")
    g.add_argument("--reference-lr-factor", type=float, default=1.0,
                   help="a deliberately wrong reference (its lr times this): shows the check can fail")
    g = p.add_argument_group("overhead, memory, mfu, resize")
    g.add_argument("--pairs", type=int, default=2, help="overhead rounds (each: the reference, then every method)")
    g.add_argument("--overhead-methods", help="the methods timed against the reference (default: --methods)")
    g.add_argument("--model", help="backbone of the probes: tiny, minilm, mpnet or a path (default mpnet; cpu: tiny)")
    g.add_argument("--train-model", help="backbone of the overhead runs (default mpnet; cpu: minilm)")
    g.add_argument("--run-dtype", choices=list(MIXED), help="precision of the overhead runs and the probes "
                   "(default bf16; cpu: fp32)")
    g.add_argument("--probe-steps", type=int, help="steps of a probe (default 30; cpu: 8)")
    g.add_argument("--batch-size", type=int, help="default 32 (cpu: 8)")
    g.add_argument("--length", type=int, help="tokens per sequence (default 128; cpu: 16)")
    g.add_argument("--rank", type=int, default=2)
    g.add_argument("--train-limit", type=int, help="overhead runs' training sentences (default 1600; cpu: 32)")
    g.add_argument("--eval-limit", type=int, help="default 256 (cpu: 16)")
    g.add_argument("--peak-tflops", type=float, help="the device's peak for --run-dtype, where the table lacks it")
    g.add_argument("--run-timeout", type=float, default=900)
    g = p.add_argument_group("cola")
    g.add_argument("--cola-preset", default="mpnet-cola")
    g.add_argument("--cola-methods", default=methods.reference_name())
    g.add_argument("--cola-set", action="append", help="KEY=VALUE for the bench, repeatable (cpu default: minilm, tiny "
                   "sizes)")
    g.add_argument("--cola-timeout", type=float, default=3600)
    return p.parse_args(argv)


def defaults(a: argparse.Namespace, cpu: bool) -> None:
    """Sizes for the device: the seed's on a GPU, tiny on the CPU (a dry run of the logic)."""
    for key, gpu, small in (("model", "mpnet", "tiny"), ("train_model", "mpnet", "minilm"),
                            ("run_dtype", "bf16", "fp32"), ("probe_steps", 30, 8), ("batch_size", 32, 8),
                            ("length", 128, 16), ("train_limit", 1600, 32), ("eval_limit", 256, 16)):
        if getattr(a, key) is None:
            setattr(a, key, small if cpu else gpu)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not torch.cuda.is_available() and (a.device or "cuda").startswith("cuda"):
        print("gpu_check: no GPU present (torch.cuda.is_available() is False); --device cpu runs the dry check "
              "on the CPU with tiny sizes", file=sys.stderr)
        return 2
    device = torch.device(a.device or "cuda")
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES] + [d for d in a.dtypes.split(",") if d not in ds.TOLERANCES]
    unknown += [m for m in ",".join(filter(None, (a.methods, a.overhead_methods, a.cola_methods))).split(",")
                if m and m not in methods.names()]
    if unknown:
        print(f"gpu_check: unknown {', '.join(unknown)} (stages: {', '.join(STAGES)}; dtypes: "
              f"{', '.join(ds.TOLERANCES)}; methods: {', '.join(methods.names())})", file=sys.stderr)
        return 2
    defaults(a, device.type == "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    output = Path(a.output or REPO / "results" / "gpu-check" / f"{slug}-{time.strftime('%Y-%m-%d')}.jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    env.setdefault("cuda_version", torch.version.cuda)
    env["command"] = "benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    check = Check(a, device, name, output, env)
    say(f"gpu_check on {name}: stages {', '.join(stages)} -> {output}")
    for stage in stages:
        try:
            RUNNERS[stage](check)
        except Exception as e:  # noqa: BLE001 - recorded; the next stage runs
            check.write(stage, "stage", status="error", error=f"{type(e).__name__}: {e}",
                        traceback=traceback.format_exc())
            check.failed.append(f"stage {stage} raised {type(e).__name__}")
            say(f"{stage}: ERROR {type(e).__name__}: {e}")
    if check.failed:
        say("gpu_check: " + "; ".join(check.failed))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
