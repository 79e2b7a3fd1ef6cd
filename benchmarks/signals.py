"""The signal check (issue "What makes AdaLoRA win", item 2): which warm-up signal sees where Adam moves?

For each task and design seed: fwrank's warm-up only (LoRA at rank 3 for K steps, the adalora_edge preset's
protocol, no training beyond step K) with every signal recorded at step K (FWRankConfig(record_signals=True)):
the gradient's Fisher statistic F_m (what fwrank's spectrum rule used), the gradient's consistency
||E G||^2 / E ||G||^2 (Adam-normalised: what Adam's step follows), the learned update ||dW_m||^2 at K, and its
output energy E ||dW_m x||^2. Then plain LoRA at rank 2 for the whole run with the same seed: where its update
ends up (||dW_m||^2 at the end). Printed and written: each signal's share on queries + keys and per matrix type,
and its Spearman correlation with LoRA's final ||dW_m||^2 over the matrices.

    python benchmarks/signals.py --tasks cola,sst2 --seeds 100,101,102 --data-dir ../shared/glue \
        --output results/adalora-edge/signals      # ~45 min alone on 2 CPU cores; LoRA runs resumable
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fwlora import analysis  # noqa: E402
from fwlora.bench import load_preset, plan  # noqa: E402
from fwlora.records import Status, read_result, run_status  # noqa: E402
from fwlora.rundir import quiet_transformers  # noqa: E402
from fwlora.train import setup, train  # noqa: E402
from fwlora.trainer import StopSignals, Trainer  # noqa: E402

SIGNALS = {"fisher": "gradient Fisher F_m (spectrum rule)", "snr": "gradient consistency ||E G||^2 / E||G||^2",
           "update": "learned update ||dW||^2 at K", "energy": "output energy E||dW x||^2 at K"}
QK = ("query", "key", "attn.q", "attn.k", "q_proj", "k_proj")


def cells(task: str, seed: int, data_dir: str, out: Path):
    preset = load_preset("adalora_edge")
    found = {c.method: c for c in plan(preset, out, {"tasks": task, "methods": "lora,fwrank", "ranks": "2",
                                                     "seeds": [seed]}, {"data_dir": data_dir})}
    probe = found["fwrank"].config.replace(fwrank_record_signals=True, output_dir=str(out / task / f"probe{seed}"),
                                           report_to="none")
    return found["lora"].config.replace(report_to="none"), probe


def probe_signals(cfg) -> dict[str, dict[str, float]]:
    """fwrank's warm-up alone (K steps, no training after it), every signal recorded at step K."""
    s = setup(cfg)
    t = Trainer(s, Path(cfg.output_dir))
    k = s.method.config().warmup_steps
    with StopSignals() as stop:
        t.fit(stop, max_steps=k)
    signals = {name: {n.removeprefix("base_model.model."): v for n, v in values.items()}
               for name, values in s.method.allocation.signals.items()}
    t.end()
    s.method.close()
    return signals


def final_update(cfg) -> dict[str, float]:
    run_dir = Path(cfg.output_dir)
    status = run_status(run_dir)
    if status != Status.COMPLETE:
        train(cfg, resume=status in (Status.RUNNING, Status.INTERRUPTED), overwrite=status in (Status.FAILED,))
    record = read_result(run_dir)
    return {m["name"]: m["fro_norm"] ** 2 for m in record.matrices}


def is_qk(name: str) -> bool:
    kind = analysis.split_matrix_name(name)[1]
    return any(kind.endswith(q) for q in QK)


def compare(signals: dict[str, dict[str, float]], target: dict[str, float]) -> dict[str, dict]:
    out = {}
    for name in (*SIGNALS, "lora_final"):
        values = target if name == "lora_final" else signals.get(name)
        if not values:
            continue
        names = [n for n in values if n in target]
        total = sum(values[n] for n in names) or 1.0
        out[name] = {"qk_share": sum(values[n] for n in names if is_qk(n)) / total,
                     "share_by_kind": analysis.share_by_kind({n: values[n] for n in names}),
                     "spearman_with_lora_final": analysis.rank_correlation([values[n] for n in names],
                                                                          [target[n] for n in names])}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="cola,sst2")
    p.add_argument("--seeds", default="100,101,102")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "glue"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "signals"), help="where the LoRA runs and probes go")
    p.add_argument("--output", default=str(ROOT / "results" / "adalora-edge" / "signals"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir, runs = Path(args.output), Path(args.runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    path = out_dir / "signals.json"
    if path.is_file():
        results = json.loads(path.read_text())
    with quiet_transformers():
        for task in args.tasks.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                key = f"{task}/seed{seed}"
                if key in results:
                    continue
                lora_cfg, probe_cfg = cells(task, seed, args.data_dir, runs)
                signals = probe_signals(probe_cfg)
                target = final_update(lora_cfg)
                results[key] = {"compare": compare(signals, target), "signals": signals, "lora_final": target}
                path.write_text(json.dumps(results, indent=1) + "\n")  # after each seed: resumable
    (out_dir / "signals.md").write_text(summary(results))
    print(summary(results))
    return 0


def summary(results: dict[str, dict]) -> str:
    lines = ["| task | signal | share on queries + keys (mean over seeds) | Spearman with LoRA's final ‖dW_m‖² "
             "(mean; per seed) |", "|---|---|---|---|"]
    for task in dict.fromkeys(k.split("/")[0] for k in results):
        keys = [k for k in results if k.startswith(task + "/")]
        for name in (*SIGNALS, "lora_final"):
            rows = [results[k]["compare"][name] for k in keys if name in results[k]["compare"]]
            if not rows:
                continue
            rho = [r["spearman_with_lora_final"] for r in rows]
            label = SIGNALS.get(name, "LoRA's own final update (the target)")
            lines.append(f"| {task} | {label} | {100 * statistics.fmean(r['qk_share'] for r in rows):.1f} % | "
                         f"{statistics.fmean(rho):+.2f} ({', '.join(f'{v:+.2f}' for v in rho)}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
