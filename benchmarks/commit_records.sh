#!/usr/bin/env bash
# Commit each run of a long bench as it ends, so that a session or machine that ends loses at most the run in
# progress:   benchmarks/commit_records.sh RUNS_DIR RESULTS_RECORDS_DIR "commit message prefix" [SECONDS]
# Every SECONDS (default 60; 0: one pass, then exit) it copies each ended run's config.json and result.json
# (complete, or failed / interrupted: the record says which) and the bench's bench.json from RUNS_DIR to the same
# place under RESULTS_RECORDS_DIR, and commits those files alone, one commit per run, its message naming the run
# and its score. A run is done when git holds its result.json as it is in RUNS_DIR; a commit that failed is tried
# again on the next pass (and makes a one-pass call exit 1). Copied back into a bench directory
# (fwlora.records.copy_records), the committed records let `fwlora bench` skip those runs on another machine.
# Run it from the repository whose results/ it fills; it reads records with $PYTHON (default .venv/bin/python).
set -u
runs=${1:?usage: commit_records.sh RUNS_DIR RESULTS_RECORDS_DIR PREFIX [SECONDS]}
dest=${2:?usage: commit_records.sh RUNS_DIR RESULTS_RECORDS_DIR PREFIX [SECONDS]}
prefix=${3:?usage: commit_records.sh RUNS_DIR RESULTS_RECORDS_DIR PREFIX [SECONDS]}
every=${4:-60}
python=${PYTHON:-.venv/bin/python}
runs=${runs%/}; dest=${dest%/}
[[ "$every" =~ ^[0-9]+$ ]] || { echo "commit_records.sh: SECONDS must be a whole number, got '$every'" >&2; exit 2; }
[ -d "$runs" ] || { echo "commit_records.sh: no directory $runs" >&2; exit 2; }
case "$(realpath -m "$dest")/" in "$(realpath "$runs")"/*)  # its copies would be found and copied again, deeper
  echo "commit_records.sh: $dest is inside $runs" >&2; exit 2 ;; esac
[ "$(git rev-parse --is-inside-work-tree 2>/dev/null)" = true ] || { echo "commit_records.sh: not inside a git work tree: $(pwd)" >&2; exit 2; }
if git check-ignore -q -- "$dest/result.json"; then echo "commit_records.sh: git ignores $dest" >&2; exit 2; fi

held() {  # git holds the run's copy in RESULTS_RECORDS_DIR as it is in RUNS_DIR
  cmp -s "$runs/$1/result.json" "$dest/$1/result.json" \
    && git ls-files --error-unmatch "$dest/$1/result.json" >/dev/null 2>&1 && git diff --quiet HEAD -- "$dest/$1"
}

message() {  # one line for the run's commit, from the copy being committed
  HF_HUB_OFFLINE=1 "$python" - "$1" <<'PY' 2>/dev/null
import sys
from fwlora.records import read_result
r = read_result(sys.argv[1])
value, seconds = r.metric_value("final"), r.train_seconds
print(f"{r.task}, {r.method}, rank {r.config.get('rank')}, seed {r.seed}, lr {r.config.get('lr')}: "
      f"{r.metric} {'n/a' if value is None else f'{value:.3f}'}, "
      f"{'n/a' if seconds is None else f'{seconds:.0f}'} s of training ({r.status})")
PY
}

while true; do
  failed=0
  while IFS= read -r -d '' rel_result; do
    rel=$(dirname "$rel_result"); run="$runs/$rel"; target="$dest/$rel"
    if held "$rel"; then continue; fi
    mkdir -p "$target" && cp "$run/result.json" "$target/result.json" || { failed=1; continue; }
    files=("$target/result.json")
    if [ -f "$run/config.json" ]; then cp "$run/config.json" "$target/" && files+=("$target/config.json"); fi
    if [ -f "$runs/bench.json" ]; then cp "$runs/bench.json" "$dest/" && files+=("$dest/bench.json"); fi
    text=$(message "$target") || text=$rel
    committed=0
    for _ in 1 2 3 4 5; do  # another git command may hold the index for a moment
      if git add -- "${files[@]}" && git commit -q -m "$prefix: $text" -- "${files[@]}"; then committed=1; break; fi
      sleep 5
    done
    if [ $committed = 0 ] && held "$rel"; then
      echo "$(date +%H:%M) $rel: already committed as it is"; continue  # another commit took it meanwhile
    fi
    if [ $committed = 1 ]; then echo "$(date +%H:%M) committed $rel: $text"
    else echo "$(date +%H:%M) NOT committed $rel (tried 5 times; again next pass)" >&2; failed=1; fi
  done < <(find -H "$runs" -name result.json -printf '%P\0' | sort -z)
  if [ "$every" = 0 ]; then exit $failed; fi
  sleep "$every"
done
