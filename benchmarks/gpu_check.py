"""One-command GPU check (under 5 minutes on one modern GPU; also runs, slowly, on a CPU):

    python benchmarks/gpu_check.py --data-dir ../shared/glue --out results/gpu

1. benchmarks/overhead.py: FW-LoRA vs LoRA step time side by side (exact, sketch, every-k, after warm-up).
2. One short training per method (CoLA subset, offline backbone, same seed) and their time ratios to LoRA.
3. FW-LoRA under fp16 with a gradient scaler and under bf16: the Fisher scores must be finite and rank the
   matrices like fp32's.
Everything it prints is also written to <out>/<device>.json and .md, named after the card.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def short_training(method: str, out: Path, data_dir: str | None, extra: dict, smoke: bool = False) -> dict:
    from fwlora.config import TrainConfig
    from fwlora.rundir import quiet_transformers
    from fwlora.train import train

    settings = dict(task="cola", method=method, model="minilm", rank=2, lr=3e-3 if method == "adalora" else 1e-3,
                    epochs=1, train_limit=64 if smoke else 3200, batch_size=32, fw_warmup_steps=1 if smoke else 50,
                    data_dir=data_dir, output_dir=str(out / method), **extra)
    with quiet_transformers():
        return train(TrainConfig.from_dict(settings), overwrite=True).to_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FWLORA_DATA_DIR", str(REPO.parent / "shared" / "glue")))
    parser.add_argument("--out", default=str(REPO / "results" / "gpu"))
    parser.add_argument("--steps", type=int, default=100, help="interleaved iterations of the overhead benchmark")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that the script runs (any device)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from scipy.stats import spearmanr

    name = device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": name, "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    lines = [f"# GPU check on {name}", ""]

    overhead_json = out_dir / f"{slug}-overhead.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--data-dir", args.data_dir,
           "--steps", str(3 if args.smoke else args.steps), "--json", str(overhead_json)]
    if args.smoke:
        cmd += ["--skip", "1", "--agreement-steps", "10"]
    subprocess.run(cmd, check=True)
    overhead = json.loads(overhead_json.read_text())
    report["overhead"] = overhead
    lines += ["## Step time, side by side (benchmarks/overhead.py)", "", overhead["table"], ""]

    with tempfile.TemporaryDirectory() as tmp:
        runs = {m: short_training(m, Path(tmp), args.data_dir, {}, args.smoke) for m in ("lora", "adalora", "fwlora")}
        lora_time = runs["lora"]["timing"]["train_seconds"]
        lines += ["## One short training per method (CoLA, 3,200 sentences, 1 epoch, rank 2)", "",
                  "| method | MCC | train s | ratio to LoRA |", "|---|---|---|---|"]
        for m, r in runs.items():
            lines.append(f"| {m} | {r['final']['mcc']:.3f} | {r['timing']['train_seconds']:.1f} | "
                         f"{r['timing']['train_seconds'] / lora_time:.3f} |")
        report["training"] = {m: {"mcc": r["final"]["mcc"], "train_seconds": r["timing"]["train_seconds"]}
                              for m, r in runs.items()}
        fp32 = [row["fisher"] for row in runs["fwlora"]["matrices"]]
        precisions = ["bf16"] + (["fp16"] if torch.cuda.is_available() else [])
        lines += ["", "## FW-LoRA Fisher scores under mixed precision", "",
                  "| precision | all finite | Spearman vs fp32 |", "|---|---|---|"]
        for precision in precisions:
            r = short_training("fwlora", Path(tmp) / precision, args.data_dir, {"mixed_precision": precision},
                               args.smoke)
            scores = [row["fisher"] for row in r["matrices"]]
            finite = all(s is not None and s == s and abs(s) != float("inf") for s in scores)
            rho = float(spearmanr(fp32, scores).statistic) if finite else float("nan")
            report[f"fisher_{precision}"] = {"finite": finite, "spearman_vs_fp32": rho}
            lines.append(f"| {precision} | {finite} | {rho:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (out_dir / f"{slug}.md").write_text(text)
    (out_dir / f"{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
