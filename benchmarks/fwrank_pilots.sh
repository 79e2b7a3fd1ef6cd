#!/usr/bin/env bash
# The pilots behind fwrank's settings (README, "fwrank: choosing the allocation signal"): CoLA and SST-2,
# seed 100, never MRPC or RTE. Resumable: run it again to finish; then `fwlora report` both directories.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/glue}
export HF_HUB_OFFLINE=1
fwlora bench --preset benchmarks/presets/fwrank_pilot_cola.yaml --output-dir runs/fwrank-pilot-cola --data-dir "$DATA" --no-report
fwlora bench --preset benchmarks/presets/fwrank_pilot_sst2.yaml --output-dir runs/fwrank-pilot-sst2 --data-dir "$DATA" --no-report
fwlora report runs/fwrank-pilot-cola runs/fwrank-pilot-sst2 --output results/fwrank-pilots
