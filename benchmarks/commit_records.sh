#!/usr/bin/env bash
# Commit each run of a long bench as it finishes, so that a session or machine that ends loses at most the run
# in progress:   benchmarks/commit_records.sh RUNS_DIR RESULTS_RECORDS_DIR "commit message prefix" [SECONDS]
# Every SECONDS (default 60; 0: once, then exit) it copies each finished run's config.json and result.json (and the bench's
# bench.json) from RUNS_DIR to the same place under RESULTS_RECORDS_DIR, and commits that directory alone, one
# commit per run, its message naming the run and its score. Copied back into a bench directory
# (fwlora.records.copy_records), the committed records let `fwlora bench` skip those runs on another machine.
# Run it from the repository whose results/ it fills; it reads records with that checkout's fwlora.
set -uo pipefail
runs=$1; dest=$2; prefix=$3; every=${4:-60}
python=${PYTHON:-.venv/bin/python}
while true; do
  while IFS= read -r result; do
    run=$(dirname "$result"); rel=${run#"$runs"/}
    if [ -f "$dest/$rel/result.json" ] && cmp -s "$result" "$dest/$rel/result.json"; then continue; fi
    mkdir -p "$dest/$rel"
    cp "$run/config.json" "$dest/$rel/" 2>/dev/null || true
    cp "$result" "$dest/$rel/result.json"
    cp "$runs/bench.json" "$dest/bench.json" 2>/dev/null || true
    message=$(HF_HUB_OFFLINE=1 "$python" - "$run" <<'PY' 2>/dev/null || echo "$rel"
import sys
from fwlora.records import read_result
r = read_result(sys.argv[1])
value, seconds = r.metric_value("final"), r.train_seconds
print(f"{r.task}, {r.method}, rank {r.config.get('rank')}, seed {r.seed}, lr {r.config.get('lr')}: "
      f"{r.metric} {'n/a' if value is None else f'{value:.3f}'}, "
      f"{'n/a' if seconds is None else f'{seconds:.0f}'} s of training ({r.status})")
PY
)
    for _ in 1 2 3 4 5; do  # another git command may hold the index for a moment
      git add -- "$dest" && git commit -q -m "$prefix: $message" -- "$dest" && break
      sleep 5
    done
    echo "$(date +%H:%M) committed $rel: $message"
  done < <(find "$runs" -name result.json 2>/dev/null | sort)
  [ "$every" = 0 ] && exit 0
  sleep "$every"
done
