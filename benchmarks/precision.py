"""bfloat16 autocast against float32 on this CPU, side by side: step time, tokens/s and FLOP/s against the
cores' peak, for each backbone (LoRA rank 2, batches of 32 CoLA sentences).

    python benchmarks/precision.py --models minilm,mpnet --steps 20 --json results/precision/cpu.json

Every iteration trains both variants (two copies of the same model) one optimizer step on the same batch, in
a shuffled order; the ratio is the median over iterations of bf16 / fp32. Whether the final metrics move is a
bench question (the presets benchmarks/presets/bf16_minilm.yaml and bf16_mpnet.yaml, 3 seeds each).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from fwlora import models  # noqa: E402
from fwlora.tasks import subset  # noqa: E402
from fwlora.tasks.glue import encode, load_task  # noqa: E402
from throughput import cpu_peak_gflops, step_flops, throughput  # noqa: E402


def build(name: str):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model, tokenizer = models.load_backbone(name, 2, "mean")
    config = LoraConfig(r=2, lora_alpha=4.0, target_modules=models.resolve_targets(model),
                        modules_to_save=models.head_modules(model))
    return get_peft_model(model, config), tokenizer


def measure(name: str, args) -> dict:
    from transformers import DataCollatorWithPadding

    fp32, tokenizer = build(name)
    bf16, _ = build(name)
    train, _, _ = load_task("cola", args.data_dir)
    rows = encode(subset(train, (args.steps + args.skip) * 32, seed=1), tokenizer, 128)
    collate = DataCollatorWithPadding(tokenizer)
    data = [collate(rows[i * 32:(i + 1) * 32]) for i in range(args.steps + args.skip)]
    variants = {"float32": (fp32, None), "bf16 autocast": (bf16, torch.bfloat16)}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, (m, _) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    rng = random.Random(0)
    for i, batch in enumerate(data):
        order = list(variants)
        rng.shuffle(order)
        for key in order:
            model, dtype = variants[key]
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss
            loss.backward()
            opts[key].step()
            opts[key].zero_grad(set_to_none=True)
            if i >= args.skip:
                times[key].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["float32"], times["bf16 autocast"])]
    tokens = statistics.median(int(b["attention_mask"].sum()) for b in data)
    padded = statistics.median(int(b["attention_mask"].numel()) for b in data)
    out = {"model": name, "iterations": args.steps, "median_ratio_bf16_over_fp32": statistics.median(ratios),
           "ratio_quartiles": statistics.quantiles(ratios, n=4), "variants": {}}
    for key, (model, dtype) in variants.items():
        flops = step_flops(model, data[-1], autocast=dtype)
        peak = cpu_peak_gflops(dtype or torch.float32)
        out["variants"][key] = {"median_step_seconds": statistics.median(times[key]),
                                **throughput(statistics.median(times[key]), tokens, padded, flops, peak)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="minilm,mpnet")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=3)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "glue"))
    p.add_argument("--json")
    args = p.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    results = [measure(m, args) for m in args.models.split(",")]
    lines = ["| model | variant | median step (s) | bf16 / fp32 (median [IQR]) | tokens/s | GFLOP a step | GFLOP/s | "
             "% of peak |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        quartiles = r["ratio_quartiles"]
        for key, v in r["variants"].items():
            ratio = f"{r['median_ratio_bf16_over_fp32']:.3f} [{quartiles[0]:.3f}, {quartiles[2]:.3f}]" if key != "float32" else "1"
            lines.append(f"| {r['model']} | {key} | {v['median_step_seconds']:.3f} | {ratio} | {v['tokens_per_second']:.0f} | "
                         f"{v['gflop_per_step']:.1f} | {v['achieved_gflops']:.1f} | {100 * v['fraction_of_peak']:.0f} % "
                         f"(of {v['peak_gflops']:.0f}) |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"results": results, "table": table, "command": " ".join(sys.argv),
                                               "torch": torch.__version__, "threads": torch.get_num_threads()},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
