"""FW-LoRA's and fwrank's cost against plain LoRA, measured side by side in one process on the same batches.

    python benchmarks/overhead.py                     # offline backbone, CoLA batches, CPU or GPU
    python benchmarks/overhead.py --steps 60 --json results/overhead/cpu.json

Every iteration trains each variant one optimizer step on the same batch, in a shuffled order, so slow
drift of the machine hits all variants alike; the table gives the median over iterations of each
variant's step time divided by LoRA's on that iteration. Variants (identical weights at the start):
  lora            plain LoRA
  fw-warmup-exact FW-LoRA during warm-up, exact ||G||^2 every step (release 1's default)
  fw-warmup-sketch FW-LoRA during warm-up, Gaussian sketch with p columns
  fw-warmup-every FW-LoRA during warm-up, exact but one step in k (release 2's default, k = 8)
  fw-warmup-sketch-every  both: the sketch, one step in k
  fw-penalty      FW-LoRA after warm-up (Gram-form penalty, no measuring)
  fwrank-warmup-every1   fwrank during warm-up: sketched gradient second moments (p columns) every step
  fwrank-warmup   fwrank during warm-up, one step in k (its default)
The whole-run ratio at the protocol's settings is (K r_warmup + (T - K) r_penalty) / T; fwrank trains plain
LoRA of the same size after its K steps (r_after = 1).

--agreement trains LoRA for K steps with every estimator attached to the same model and reports the
Spearman rank correlation of each estimator's scores with the exact ones (does the cheap one rank the
matrices the same way?).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from fwlora import FisherRankAllocation, FisherWeightedLoRA, FWLoRAConfig, FWRankConfig  # noqa: E402
from fwlora import models  # noqa: E402
from fwlora.tasks import subset  # noqa: E402
from fwlora.tasks.glue import encode, load_task  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from throughput import cpu_peak_gflops, step_flops, throughput  # noqa: E402

PROTOCOL_RUNS = {"CoLA, 3 epochs (804 steps)": 804, "SST-2, 3 epochs (6,315 steps)": 6315}


def batches(task: str, data_dir: str | None, n: int, batch_size: int, tokenizer, seed: int = 0):
    from transformers import DataCollatorWithPadding

    train, _, _ = load_task(task, data_dir)
    encoded = encode(subset(train, n * batch_size, seed=seed), tokenizer, 128)
    rng = random.Random(seed)
    rows: list = []
    while len(rows) < n * batch_size:  # more steps than one epoch holds: further epochs, reshuffled
        epoch = list(encoded)
        rng.shuffle(epoch)
        rows += epoch
    collate = DataCollatorWithPadding(tokenizer)
    return [collate(rows[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


def build(rank: int, head: str, device: torch.device):
    torch.manual_seed(0)
    from peft import LoraConfig, get_peft_model

    model, tokenizer = models.load_backbone("minilm", 2, head)
    targets = models.resolve_targets(model)
    config = LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=targets, modules_to_save=models.head_modules(model))
    return get_peft_model(model, config).to(device), tokenizer


class Variant:
    def __init__(self, name: str, model, fw: FisherWeightedLoRA | None, lr: float):
        self.name, self.model, self.fw = name, model, fw
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.times: list[float] = []

    def step(self, batch, device) -> float:
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = self.model(**batch).loss
        if isinstance(self.fw, FisherWeightedLoRA):
            loss = loss + self.fw.penalty()
        loss.backward()
        if self.fw is not None:
            self.fw.step()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def measure(args, device) -> dict:
    configs = {
        "lora": None,
        "fw-warmup-exact": FWLoRAConfig(warmup_steps=10**9, measure_every=1),
        "fw-warmup-sketch": FWLoRAConfig(warmup_steps=10**9, estimator="sketch", sketch_size=args.sketch_size,
                                         measure_every=1),
        "fw-warmup-every": FWLoRAConfig(warmup_steps=10**9, measure_every=args.every),
        "fw-warmup-sketch-every": FWLoRAConfig(warmup_steps=10**9, estimator="sketch", sketch_size=args.sketch_size,
                                               measure_every=args.every),
        "fw-penalty": FWLoRAConfig(warmup_steps=1),
        "fwrank-warmup-every1": FWRankConfig(warmup_steps=10**9, sketch_size=args.sketch_size, measure_every=1),
        "fwrank-warmup": FWRankConfig(warmup_steps=10**9, sketch_size=args.sketch_size, measure_every=args.every),
    }
    variants = []
    tokenizer = None
    for name, config in configs.items():
        model, tokenizer = build(args.rank, args.head, device)
        model.train()
        if isinstance(config, FWRankConfig):
            fw = FisherRankAllocation(model, config)
        else:
            fw = FisherWeightedLoRA(model, config) if config is not None else None
        variants.append(Variant(name, model, fw, args.lr))
    data = batches(args.task, args.data_dir, args.steps + args.skip, args.batch_size, tokenizer)
    rng = random.Random(1)
    ratios: dict[str, list[float]] = {v.name: [] for v in variants[1:]}
    for i, batch in enumerate(data):
        order = variants[:]
        rng.shuffle(order)
        times = {v.name: v.step(batch, device) for v in order}
        if i < args.skip:  # the first steps pay for allocations and, for fw-penalty, the warm-up step
            continue
        for v in variants:
            v.times.append(times[v.name])
        for name in ratios:
            ratios[name].append(times[name] / times["lora"])
    lora = variants[0]
    tokens = statistics.median(int(b["attention_mask"].sum()) for b in data[args.skip:])
    padded = statistics.median(int(b["attention_mask"].numel()) for b in data[args.skip:])
    flops = step_flops(lora.model, {k: v.to(device) for k, v in data[-1].items()})
    peak = cpu_peak_gflops() if device.type == "cpu" else {"gflops": float("nan"), "assumes": "a GPU: not computed"}
    return {
        "throughput_lora": throughput(statistics.median(lora.times), tokens, padded, flops, peak),
        "median_step_seconds": {v.name: statistics.median(v.times) for v in variants},
        "median_ratio": {k: statistics.median(r) for k, r in ratios.items()},
        "ratio_quartiles": {k: statistics.quantiles(r, n=4) for k, r in ratios.items()},
        "iterations": args.steps,
    }


def agreement(args, device) -> dict:
    """Spearman of each cheap estimator's scores with the exact ones, all measured on one LoRA run."""
    from scipy.stats import spearmanr

    model, tokenizer = build(args.rank, args.head, device)
    model.train()
    k = args.agreement_steps
    estimators = {"exact": FWLoRAConfig(warmup_steps=k, measure_every=1)}
    for p in (2, args.sketch_size, 32):
        estimators[f"sketch p={p}"] = FWLoRAConfig(warmup_steps=k, estimator="sketch", sketch_size=p, seed=p,
                                                   measure_every=1)
    for every in [e for e in (args.every, 4 * args.every) if e <= k]:
        estimators[f"exact, every {every}"] = FWLoRAConfig(warmup_steps=k, measure_every=every)
    if args.every <= k:
        estimators[f"sketch p={args.sketch_size}, every {args.every}"] = FWLoRAConfig(
            warmup_steps=k, estimator="sketch", sketch_size=args.sketch_size, measure_every=args.every, seed=99)
    fws = {name: FisherWeightedLoRA(model, cfg) for name, cfg in estimators.items()}
    # fwrank's statistic: trace of the sketched second moment, its default schedule (one step in k)
    rank_stats = {f"fwrank trace, p={args.sketch_size}, every {e}": FisherRankAllocation(
        model, FWRankConfig(warmup_steps=k + 1, sketch_size=args.sketch_size, measure_every=e, seed=7))
        for e in (1, args.every) if e <= k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    for batch in batches(args.task, args.data_dir, k, args.batch_size, tokenizer, seed=1):
        batch = {key: v.to(device) for key, v in batch.items()}
        model(**batch).loss.backward()
        for fw in fws.values():
            fw.step()
        opt.step()
        for fr in rank_stats.values():
            fr.step()
        opt.zero_grad(set_to_none=True)
    exact = fws["exact"].importance
    names = list(exact)
    out = {}
    for name, fw in fws.items():
        if name == "exact":
            continue
        rho = spearmanr([exact[n] for n in names], [fw.importance[n] for n in names]).statistic
        rel = statistics.median(abs(fw.importance[n] / exact[n] - 1) for n in names if exact[n] > 0)
        out[name] = {"spearman": float(rho), "median_relative_error": float(rel)}
    for name, fr in rank_stats.items():
        total = sum(fr.fisher.values())
        scores = {n: v / total for n, v in fr.fisher.items()}
        rho = spearmanr([exact[n] for n in names], [scores[n] for n in names]).statistic
        rel = statistics.median(abs(scores[n] / exact[n] - 1) for n in names if exact[n] > 0)
        out[name] = {"spearman": float(rho), "median_relative_error": float(rel)}
    return {"steps": k, "matrices": len(names), "estimators": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cola")
    parser.add_argument("--data-dir", default=os.environ.get("FWLORA_DATA_DIR", str(REPO.parent / "shared" / "glue")))
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--head", default="mean")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=60, help="measured iterations (each trains every variant once)")
    parser.add_argument("--skip", type=int, default=5, help="iterations discarded at the start")
    parser.add_argument("--sketch-size", type=int, default=8)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=500, help="K of the protocol, for the whole-run ratio")
    parser.add_argument("--fwrank-warmup-steps", type=int, default=200, help="fwrank's K, for its whole-run ratio")
    parser.add_argument("--agreement-steps", type=int, default=200, help="0 skips the estimator agreement check")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; MiniLM-L6, LoRA rank {args.rank}, batch {args.batch_size} of {args.task}, "
          f"{args.steps} interleaved iterations")
    m = measure(args, device)
    lines = ["| variant | median step (s) | ratio to LoRA (median) | ratio IQR |", "|---|---|---|---|"]
    for name, seconds in m["median_step_seconds"].items():
        if name == "lora":
            lines.append(f"| lora | {seconds:.4f} | 1 | |")
            continue
        quartiles = m["ratio_quartiles"][name]
        lines.append(f"| {name} | {seconds:.4f} | {m['median_ratio'][name]:.3f} | "
                     f"{quartiles[0]:.3f} - {quartiles[2]:.3f} |")
    lora = m["throughput_lora"]
    lines += ["", f"LoRA's step: {lora['tokens_per_second']:.0f} tokens/s ({lora['padded_tokens_per_second']:.0f} with "
              f"padding), {lora['gflop_per_step']:.1f} GFLOP a step (forward + backward, FlopCounterMode), "
              f"{lora['achieved_gflops']:.1f} GFLOP/s = {100 * lora['fraction_of_peak']:.0f} % of the peak "
              f"{lora['peak_gflops']:.0f} GFLOP/s ({lora['peak_assumes']})"]
    whole = {}
    post = m["median_ratio"]["fw-penalty"]
    lines += ["", f"whole run with K = {args.warmup_steps} warm-up steps (K r_warmup + (T - K) r_penalty) / T:",
              f"(fwrank: its K = {args.fwrank_warmup_steps}, then plain LoRA of the same size)",
              "| run | FW exact | FW sketch | FW exact, every k | FW sketch, every k | fwrank every step | fwrank every k |",
              "|---|---|---|---|---|---|---|"]
    variants = ("exact", "sketch", "every", "sketch-every")
    for label, total in PROTOCOL_RUNS.items():
        k = min(args.warmup_steps, total)
        row = {v: (k * m["median_ratio"][f"fw-warmup-{v}"] + (total - k) * post) / total for v in variants}
        kr = min(args.fwrank_warmup_steps, total)
        for v, key in (("fwrank-every1", "fwrank-warmup-every1"), ("fwrank", "fwrank-warmup")):
            row[v] = (kr * m["median_ratio"][key] + (total - kr)) / total
        whole[label] = row
        lines.append(f"| {label} | " + " | ".join(f"{row[v]:.3f}" for v in (*variants, "fwrank-every1", "fwrank")) + " |")
    result = {"device": device_name, "settings": vars(args), "steps": m, "whole_run": whole,
              "targets": {"after_warmup": 1.005, "whole_run": 1.01}}
    print("\n".join(lines), flush=True)  # the timings first: the agreement run takes a while
    if args.agreement_steps:
        a = agreement(args, device)
        result["agreement"] = a
        block = [f"estimator agreement with the exact scores after {a['steps']} warm-up steps "
                 f"({a['matrices']} matrices, one LoRA run):",
                 "| estimator | Spearman rho | median relative error of I_m |", "|---|---|---|"]
        block += [f"| {n} | {v['spearman']:.4f} | {v['median_relative_error']:.3f} |" for n, v in a["estimators"].items()]
        lines += ["", *block]
        print("\n".join(block))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "table": "\n".join(lines), "command": " ".join(sys.argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
