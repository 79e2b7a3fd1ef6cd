#!/usr/bin/env bash
# A sweep shared through PostgreSQL, and what happens when a machine dies: two `fwlora sweep` workers
# (as if on two machines: each its own --output-dir, only the database shared) run one study per
# method; one is killed with SIGKILL in the middle of a trial; the other notices the missing heartbeats,
# marks that trial failed, runs a replacement, and the studies end with exactly --trials complete
# trials each, none trained twice. Real training: the bundled MiniLM on a tiny CoLA slice.
#
# Needs the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql) and a driver in the Python
# environment (pip install psycopg2-binary, or psycopg[binary]). Run from the repository root:
#   bash benchmarks/sweep_postgres.sh                      # ~1-2 minutes on 2 CPU cores
#   DATA_DIR=../shared/glue TRIALS=4 METHODS=lora,adalora,fwlora bash benchmarks/sweep_postgres.sh
# KEEP=1 keeps the work directory (server log, worker logs, trial directories).
#
# On real machines the server is started once, and each machine runs the same command:
#   fwlora sweep --storage postgresql://USER:PASSWORD@HOST:5432/DB --methods lora,fwlora --trials 20 ...
# with the default heartbeat (60 s) and grace period (300 s); this script shortens both to 2 s / 6 s.
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TRIALS=${TRIALS:-3}
METHODS=${METHODS:-lora,fwlora}
HEARTBEAT=${HEARTBEAT:-2}
GRACE=${GRACE:-6}

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$PG_BIN" ] && command -v initdb >/dev/null; then PG_BIN=$(dirname "$(command -v initdb)"); fi
if [ -z "$PG_BIN" ]; then echo "no PostgreSQL server found: apt-get install postgresql" >&2; exit 2; fi
"$PYTHON" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("psycopg2") or u.find_spec("psycopg")))' \
    || { echo "no PostgreSQL driver in $PYTHON's environment: pip install psycopg2-binary" >&2; exit 2; }

WORK=$(mktemp -d /tmp/fwlora-sweep-pg.XXXXXX)
AS=()
if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root: run it as the package's postgres user
    id postgres >/dev/null 2>&1 || { echo "running as root without a postgres user to run the server as" >&2; exit 2; }
    chown postgres: "$WORK"
    AS=(runuser -u postgres --)
fi
PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    "${AS[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -m immediate -w stop >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== PostgreSQL ($PG_BIN) on 127.0.0.1:$PORT, data in $WORK/pgdata"
"${AS[@]}" "$PG_BIN/initdb" -D "$WORK/pgdata" -U sweep --auth=trust --no-sync -E UTF8 >/dev/null
"${AS[@]}" "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories='$WORK' -c fsync=off" >/dev/null
"${AS[@]}" "$PG_BIN/createdb" -h 127.0.0.1 -p "$PORT" -U sweep sweep
URL="postgresql://sweep@127.0.0.1:$PORT/sweep"

DATA=${DATA_DIR:-}
if [ -z "$DATA" ]; then  # a tiny CoLA-format task: what the sweep does, not what it finds, is the point here
    DATA="$WORK/glue"
    "$PYTHON" - "$DATA" <<'EOF'
import sys
from pathlib import Path
folder = Path(sys.argv[1]) / "cola"
folder.mkdir(parents=True)
words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "quickly", "blue"]
for split, n in (("train", 48), ("validation", 32)):
    rows = [" ".join(words[(i * 7 + k) % len(words)] for k in range(3 + i % 5)) + f"\t{(i * 5) % 3 % 2}" for i in range(n)]
    (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
EOF
fi
cat > "$WORK/space.yaml" <<'EOF'
lr: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}
lambda_fw: {type: float, low: 5.0e-5, high: 5.0e-4, log: true, methods: [fwlora]}
fw_warmup_steps: {type: categorical, choices: [1, 2], methods: [fwlora]}
rank: null
batch_size: null
EOF

worker() {  # the command every machine runs (only --output-dir differs: trial directories stay local);
    # exec: the background job's pid is then the worker's own, which the kill below must hit
    exec "$PYTHON" -m fwlora sweep --storage "$URL" --methods "$METHODS" --trials "$TRIALS" \
        --heartbeat-seconds "$HEARTBEAT" --grace-seconds "$GRACE" --pruner none --space "$WORK/space.yaml" \
        --task cola --model minilm --rank 1 --epochs 2 --batch-size 16 --train-limit 32 --eval-limit 32 \
        --max-length 16 --threads 1 --data-dir "$DATA" --output-dir "$WORK/$1"
}
echo "== two workers: machine-a and machine-b"
worker machine-a >"$WORK/machine-a.log" 2>&1 & A=$!
worker machine-b >"$WORK/machine-b.log" 2>&1 & B=$!
PIDS=("$A" "$B")

# machine-a dies in the middle of its first trial: config.json is written once the run has been set up
for _ in $(seq 1 1200); do
    compgen -G "$WORK/machine-a/*/trial*/config.json" >/dev/null && break
    kill -0 "$A" 2>/dev/null || { echo "machine-a ended before its first trial:" >&2; cat "$WORK/machine-a.log" >&2; exit 1; }
    sleep 0.1
done
kill -KILL "$A"
wait "$A" 2>/dev/null || true
echo "== killed machine-a (pid $A) during $(compgen -G "$WORK/machine-a/*/trial*/config.json" | head -n 1 | sed "s|$WORK/||")"

if ! wait "$B"; then echo "machine-b failed:" >&2; cat "$WORK/machine-b.log" >&2; exit 1; fi
grep -E "sent no heartbeat|waiting for trial" "$WORK/machine-b.log" || true

echo "== the studies"
"$PYTHON" - "$URL" "$WORK" "$METHODS" "$TRIALS" "$A" <<'EOF'
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from fwlora import records, sweep

url, work, method_list, trials, killed_pid = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5])
storage = sweep.open_storage(url, work).storage
problems = []
for method in method_list:
    study = optuna.load_study(study_name=f"cola-{method}", storage=storage)
    print(f"{study.study_name}:")
    for t in study.get_trials(deepcopy=False):
        worker = t.user_attrs.get("worker", {})
        dirs = [work / m / study.study_name / f"trial{t.number}" for m in ("machine-a", "machine-b")]
        ran = [d for d in dirs if d.is_dir()]
        note = t.user_attrs.get("fail_reason") or ("surplus" if t.user_attrs.get("surplus") else "")
        value = f"{t.value:.4f}" if t.value is not None else "-"
        print(f"  trial {t.number}: {t.state.name:8} {value:>7}  pid {worker.get('pid')}  "
              f"{', '.join(f'{d.parent.parent.name}: {records.run_status(d)}' for d in ran) or 'never trained'}  {note}")
        if len(ran) > 1:
            problems.append(f"{study.study_name} trial {t.number} was trained on both machines")
        if t.state == TrialState.COMPLETE and (not ran or records.run_status(ran[0]) != records.Status.COMPLETE):
            problems.append(f"{study.study_name} trial {t.number}: complete, but no complete run directory")
        if t.state == TrialState.FAIL and not t.user_attrs.get("surplus") and not (
                worker.get("pid") == killed_pid and "no heartbeat" in note):
            problems.append(f"{study.study_name} trial {t.number} failed for another reason: {note}")
    counts = sweep.study_counts(study)
    if counts["complete"] != trials or counts["running"]:
        problems.append(f"{study.study_name}: {counts['complete']} complete, {counts['running']} running (wanted {trials}, 0)")
failed = sum(sweep.study_counts(optuna.load_study(study_name=f"cola-{m}", storage=storage))["failed"] for m in method_list)
if failed != 1:
    problems.append(f"{failed} failed trials over the studies: wanted exactly the killed worker's one")
print("\n".join(["PROBLEMS:"] + problems) if problems else
      f"OK: {trials} complete trials per method, the killed worker's trial failed by its missing heartbeat and "
      "replaced, none trained twice")
sys.exit(1 if problems else 0)
EOF
