"""`fwlora predict`: a finished run's predictions on a file or on its task's evaluation data
(fwlora.inference)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from fwlora.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predictions of a finished run on a file or on its evaluation data",
        description="Load a finished run (its backbone, head, adapter and tokenizer) and write one row per "
                    "example: "
                    "classification the label and each class's probability, regression the value, an "
                    "instruction "
                    "run the generated response. Without --dataset: the run's own evaluation data (its "
                    "task's "
                    "validation split, or its held-out slice). Batched and length-sorted; rows come out in "
                    "input "
                    "order. Where the data has the run's labels, the metrics are printed too.",
        epilog="examples:\n  fwlora predict runs/cola-lora --output preds.csv\n"
               "  fwlora predict runs/tickets --dataset new_tickets.csv --text-columns body --output "
               "preds.csv\n"
               "  fwlora predict runs/sharegpt-lora --dataset prompts.jsonl --prompt-column prompt "
               "--max-new-tokens 64",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a complete run directory (fwlora train / "
                                                                 "bench)")
    p.add_argument("--dataset", help="a .csv, .tsv, .json, .jsonl or .parquet file (default: the run's "
                                     "evaluation data)")
    p.add_argument("--text-columns", help="the text column(s), a[,b] (default: the run's)")
    p.add_argument("--prompt-column", help="instruction runs: the prompt column (default: prompt)")
    p.add_argument("--label-column", help="a label column to score the predictions against (default: the "
                                          "run's, "
                                          "where the file has it)")
    p.add_argument("--output", type=Path, help="where the predictions go: .csv or .jsonl (default: print "
                                               "JSON lines)")
    p.add_argument("--batch-size", type=int, default=64, help="examples per forward pass (default: 64)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="instruction runs: the generation limit "
                                                                   "(default: 256)")
    p.add_argument("--limit", type=int, help="predict the first N examples only")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, else the CPU), "
                                                    "cpu, cuda "
                                                    "or cuda:N; the model runs in the dtype it was trained "
                                                    "in")
    p.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fwlora import inference
    from fwlora.rundir import quiet_transformers

    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch-size, --max-new-tokens and --limit must be >= 1")
    with quiet_transformers():
        run = inference.load_run(args.run_dir, device=inference.resolve_device(args.device))
        inputs, labels, source = inference.prediction_inputs(run, args.dataset, args.text_columns, args.prompt_column,
                                                             args.label_column)
        if args.limit:
            inputs, labels = inputs[: args.limit], (labels[: args.limit] if labels is not None else None)
        with tqdm(total=len(inputs), desc=f"predict {run.config.task}", unit="example", leave=False) as bar:
            rows = inference.predict(run, inputs, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                     progress=bar.update)
    table = inference.prediction_table(run, inputs, rows)
    _write(table, args.output)
    print(f"{len(rows)} predictions ({run.kind}) from {source}" + (f" -> {args.output}" if args.output else ""),
          file=sys.stderr)
    if labels is not None:
        metrics = inference.score(run, rows, labels)
        print("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), file=sys.stderr)
    return 0


def _write(table: list[dict], output: Path | None) -> None:
    if output is None:
        for row in table:
            print(json.dumps(row, ensure_ascii=False))
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".jsonl":
        output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table), encoding="utf-8")
        return
    if output.suffix.lower() != ".csv":
        raise UserError(f"--output {output}: write .csv or .jsonl")
    with open(output, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["prediction"])
        writer.writeheader()
        writer.writerows(table)
