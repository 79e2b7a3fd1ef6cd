#!/usr/bin/env bash
# What produces results/fwrank (release 2's headline), in order; resumable (every step skips or continues
# finished work), so run it again after an interruption. Run from the repository root, alone on the machine
# (time ratios are measured side by side). Each step's output is committed as it finishes.
#   1. the pilots that chose fwrank's settings (seed 100; CoLA and SST-2 only)   -> results/fwrank-pilots
#   2. the step cost side by side (FW-LoRA's and fwrank's estimators)             -> results/overhead/cpu-r2.json
#   3. the comparison on CoLA and SST-2, 5 seeds                                   -> results/fwrank
#   4. MRPC, held out: run ONCE, after the settings above are frozen and committed -> results/fwrank-mrpc
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
DATA=${FWLORA_DATA_DIR:-../shared/glue}
FW=.venv/bin/fwlora
bash benchmarks/fwrank_pilots.sh
[ -f results/overhead/cpu-r2.json ] || .venv/bin/python benchmarks/overhead.py --data-dir "$DATA" --steps 60 \
    --agreement-steps 300 --fwrank-warmup-steps 200 --json results/overhead/cpu-r2.json
$FW bench --preset fwrank --output-dir runs/fwrank --data-dir "$DATA" --no-report
$FW report runs/fwrank --output results/fwrank
if [ "${HELD_OUT:-0}" = 1 ]; then  # step 4 only when asked: HELD_OUT=1 bash benchmarks/fwrank_pipeline.sh
  $FW bench --preset fwrank --tasks mrpc --output-dir runs/fwrank-mrpc --data-dir "$DATA" --no-report
  $FW report runs/fwrank-mrpc --output results/fwrank-mrpc
fi
