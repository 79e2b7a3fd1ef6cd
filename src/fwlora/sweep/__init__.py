"""`fwlora sweep`: a hyper-parameter search with Optuna around `train`, resumable and shareable.

One Optuna study per method, named "<task>-<method>" (or "<prefix>-<task>-<method>" with
--study-name PREFIX); every method gets the same number of trials (--trials, a TOTAL per study, not
per process). A trial trains --seeds-per-trial runs (seeds S, S+1, ... from --seed S, the same for
every trial) into <output-dir>/<study>/trial<number>[-seed<k>]/ and its value is the mean of their
validation metric (MCC for CoLA, accuracy otherwise) at the final epoch (--objective final, the
default: what a fixed-epoch protocol reports; --objective best takes each run's best epoch, which
picks the maximum on the very dev set it reports, an optimistic number).

Search space (space.py): docs/method.md's shared ranges (lr, rank, batch_size) plus each registered
method's own `search_space` (FW-LoRA: lambda_fw, fw_warmup_steps), searched in that method's study
only; --space FILE (YAML/JSON) replaces entries key by key, `key: null` drops one. A training flag
given on the command line fixes that setting and takes it out of the space (--budget or --rank fixes
the rank). A combination the method refuses before training (its Method.check: FW-LoRA's
fw_warmup_steps >= the run's optimizer steps, say) is not clamped, which would record a parameter
that was never used: the trial is PRUNED untrained, its reason in the trial's user attribute
"infeasible", and TPE learns to avoid the region. It counts as one of the --trials.

Pruning: after each epoch the trial reports its metric (for seed i, epoch e, at step i*epochs + e;
the seeds are the same in every trial, so the steps compare like with like) and a MedianPruner
(--prune-startup-trials, --prune-from-epoch) may stop it: state PRUNED, its run directory's
result.json a record with status "pruned" (fwlora.records).

Outcomes: a run that diverges (NaN) is a FAIL that counts (the parameters were tried; the reason is in
"fail_reason"); a mistake the user must fix (missing data, a bad setting) stops the sweep; SIGINT or
SIGTERM marks the running trial FAIL ("interrupted", not counted) and exits with 130/143.

Storage and workers (storage.py, runner.py): the default storage is <output-dir>/optuna.journal
(several processes on one machine); --storage postgresql://... lets several machines share the
studies, with heartbeats (--heartbeat-seconds, --grace-seconds) that fail a dead worker's trial so
that another replaces it. Start as many workers as you like with the same command; they share the
total. Before taking a trial a worker counts the trials that are complete, pruned, counted failures
or running; when the count reaches --trials it takes no more, but waits while trials it can watch
still run (any, on a database; live processes of this host, on a local file) and replaces those that
fail. On a local file a lock makes count-and-take atomic; on a server a worker that lost a race sees
it from the trial numbers and closes its surplus trial at once as FAIL (user attribute "surplus"), so
no study exceeds --trials and no trial runs twice. On a local file, trials left RUNNING by a killed
process of this host are marked FAIL on the next look and replaced.

Resume: run the same command again; it continues each study (load_if_exists) until --trials.
--trials 0 only (re)writes the outputs. The sampler is TPE, re-seeded for every trial from
(--sampler-seed, trial number), so one worker resumed any number of times samples the same
parameters as one run straight through (with several workers the order of completions varies, so
the draws after TPE's random start-up do too). Seeds depend on the trial number only, so during the
start-up trial n of every method's study draws the same values of the shared parameters (lr, rank,
batch_size): a paired comparison of the methods. A study remembers its settings, space, seeds and
objective and refuses a command that would mix in different ones.

Outputs (export.py), in <output-dir>, written by each worker when it finishes: best_params.json,
importance.json, plots/, best_<method>.yaml, tuned_preset.yaml, sweep_summary.md and sweep.json.
The command line (flags, help, exit codes) is fwlora.cli.sweep.
"""

from fwlora.sweep.config import (OBJECTIVES, PER_CELL, PRUNERS, STUDY_ATTR, SweepConfig, counts_toward_total,
                                 describe_diff)
from fwlora.sweep.export import (best_config, export, param_importances, study_counts, summary_markdown,
                                 write_plots, write_tuned_preset)
from fwlora.sweep.runner import Sweep, TrainFn, close_pruned_run, infeasible_reason, run_sweep, train_size
from fwlora.sweep.space import (SHARED_SPACE, Param, default_space, format_params, load_space, parse_param,
                                parse_space)
from fwlora.sweep.storage import (GRACE_ENV, GRACE_SECONDS, HEARTBEAT_ENV, HEARTBEAT_SECONDS, JOURNAL_FILE,
                                  Storage, fail_stale_trials, open_storage)

__all__ = ["OBJECTIVES", "PER_CELL", "PRUNERS", "STUDY_ATTR", "SweepConfig", "counts_toward_total", "describe_diff",
           "best_config", "export", "param_importances", "study_counts", "summary_markdown", "write_plots",
           "write_tuned_preset", "Sweep", "TrainFn", "close_pruned_run", "infeasible_reason", "run_sweep",
           "train_size", "SHARED_SPACE", "Param", "default_space", "format_params", "load_space",
           "parse_param", "parse_space", "GRACE_ENV", "GRACE_SECONDS", "HEARTBEAT_ENV", "HEARTBEAT_SECONDS",
           "JOURNAL_FILE", "Storage", "fail_stale_trials", "open_storage"]
