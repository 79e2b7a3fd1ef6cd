"""`fwlora export`: a finished run's adapter (standard PEFT) or a merged standalone model
(fwlora.inference)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run's adapter, or a merged model that loads without fwlora",
        description="Write the run's adapter as a standard PEFT adapter (PeftModel.from_pretrained on the "
                    "backbone), "
                    "or with --merged the adapter merged into the backbone (PEFT's merge_and_unload): a "
                    "model with "
                    "its architecture's own head loads with transformers alone "
                    "(AutoModelForSequenceClassification / "
                    "AutoModelForCausalLM); a mean-pooling head (minilm, mpnet) is written as a "
                    "sentence-transformers "
                    "model plus classifier.safetensors (the README shows the five-line loader).",
        epilog="examples:\n  fwlora export runs/cola-lora exports/cola-adapter\n"
               "  fwlora export runs/cola-lora exports/cola-merged --merged",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a complete run directory")
    p.add_argument("out", type=Path, metavar="OUT", help="a new (or empty) directory")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the backbone (a standalone "
                                                         "model)")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from fwlora.inference import export_run
    from fwlora.rundir import quiet_transformers

    with quiet_transformers():
        out = export_run(args.run_dir, args.out, merged=args.merged)
    print(f"{'merged model' if args.merged else 'adapter'} of {args.run_dir} -> {out}")
    return 0
