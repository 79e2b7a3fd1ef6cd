#!/usr/bin/env bash
# What produced results/: the cpu bench, then (on the now quiet machine) the overhead benchmark, the
# tuned-settings sweep and the bench at each method's tuned settings. Resumable: every step skips or
# continues finished work. Run from the repository root: bash benchmarks/cpu_pipeline.sh
set -euo pipefail
export HF_HUB_OFFLINE=1
DATA=${FWLORA_DATA_DIR:-../shared/glue}
FW=.venv/bin/fwlora
$FW bench --preset cpu --output-dir runs/cpu --data-dir "$DATA"
.venv/bin/python benchmarks/overhead.py --data-dir "$DATA" --steps 60 --agreement-steps 300 --json results/overhead/cpu.json
$FW sweep --task cola --methods lora,adalora,fwlora --trials 6 --model minilm --rank 2 --epochs 3 --batch-size 32 \
    --seed 100 --data-dir "$DATA" --space examples/sweep_space_cpu.yaml --output-dir runs/sweep-cpu
$FW bench --preset runs/sweep-cpu/tuned_preset.yaml --tasks cola --seeds 3 --output-dir runs/cpu-tuned --data-dir "$DATA"
$FW report runs/cpu runs/cpu-tuned --output results/cpu
# The pilot runs behind the cpu preset's choices (README, "Decisions"): CoLA, rank 2, seed 0, 3 epochs.
pilot() { name=$1; shift; $FW train --task cola --rank 2 --data-dir "$DATA" --output-dir "runs/pilots/$name" "$@" \
          || [ -f "runs/pilots/$name/result.json" ]; }
pilot lora-mean-lr2e-4 --method lora --head mean --lr 2e-4 --resume
pilot lora-mean-lr1e-3 --method lora --head mean --lr 1e-3 --resume
pilot lora-cls-lr1e-3 --method lora --head model --lr 1e-3 --resume
pilot adalora-mean-lr1e-3 --method adalora --head mean --lr 1e-3 --resume
pilot adalora-mean-lr3e-3 --method adalora --head mean --lr 3e-3 --resume
$FW report runs/pilots --output runs/pilots/report   # committed: results/pilots (see its README)
