#!/usr/bin/env bash
# A bench grid as a Slurm job array: each array task runs PACK bench workers on its GPU, all on one shared
# output directory. Worker i of N runs the grid's seed/task/budget groups i, i+N, ... (the methods of a group
# back to back, so time ratios stay within one worker), claims each run in its directory before training it,
# then takes what other workers left unstarted or stale (a killed or requeued task's runs get done).
#
#   sbatch --array=0-17 benchmarks/slurm_bench.sh                 # the seed's grid (paper: 72 runs, 18 groups), 18 GPUs
#   PACK=3 sbatch --array=0-5 benchmarks/slurm_bench.sh           # 6 GPUs, 3 workers packed on each
#   PRESET=seed-table-mpnet OUT=runs/seed-table sbatch --array=0-5 benchmarks/slurm_bench.sh --data-dir ../shared/glue
#   LAUNCH="torchrun --standalone --nproc_per_node 2" sbatch --gres=gpu:2 --array=0-8 benchmarks/slurm_bench.sh
#                                                                 # each worker a data-parallel run over 2 GPUs
#
# Arguments after the script go to `fwlora bench`. Run from the repository root; OUT must be on a file system
# every node sees, and the nodes' clocks in step (NTP): a claim without a heartbeat for --claim-timeout seconds
# (default 600) is taken over. The worker that finishes last writes OUT/report (or: fwlora report OUT).
# Packed workers share the GPU (MPS=1 starts NVIDIA MPS for them where the node allows it): their runs take
# longer and their times are noisier than alone; for the time claims, give each worker a GPU of its own.
#SBATCH --job-name=fwlora-bench
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
PRESET=${PRESET:-paper}
OUT=${OUT:-runs/$PRESET}
PACK=${PACK:-1}
LAUNCH=${LAUNCH:-python}
PYTHON_BIN=$(dirname "${FWLORA_PYTHON:-.venv/bin/python}")
export PATH="$PYTHON_BIN:$PATH"
TASK=$(( (SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}) / ${SLURM_ARRAY_TASK_STEP:-1} ))
WORKERS=$(( SLURM_ARRAY_TASK_COUNT * PACK ))
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-8} / PACK > 0 ? ${SLURM_CPUS_PER_TASK:-8} / PACK : 1 ))
if [ "${MPS:-0}" = 1 ] && [ "$PACK" -gt 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=${TMPDIR:-/tmp}/mps-$SLURM_JOB_ID-$TASK
  export CUDA_MPS_LOG_DIRECTORY=${TMPDIR:-/tmp}/mps-log-$SLURM_JOB_ID-$TASK
  nvidia-cuda-mps-control -d
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
pids=()
# SIGTERM (time limit, preemption, scancel): each worker checkpoints, records its run as interrupted and
# releases its claims; a requeued task or another worker resumes the run from that checkpoint.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
for k in $(seq 0 $(( PACK - 1 ))); do
  $LAUNCH -m fwlora bench --preset "$PRESET" --output-dir "$OUT" --worker "$(( TASK * PACK + k ))/$WORKERS" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid" && code=0 || code=$?
    if [ "$code" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi  # the trap woke us: it is still saving
    break
  done
  if [ "$code" -ne 0 ]; then status=$code; fi
done
exit "$status"
