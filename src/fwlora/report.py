"""`fwlora report`: tables, paired statistics, verdicts and plots from finished run directories.

Everything in report.md is computed from the runs' result.json files; nothing is typed by hand.

Reading. Each RUN_DIR is scanned for run directories (a directory with result.json or config.json).
Only result.json files are read for numbers, and they are written atomically, so a run still in progress
(config.json alone) is counted as unfinished and never half-read. A failed run is counted as failed.

Protocols. A bench directory (one with bench.json) is one protocol: the runs of one `fwlora bench` call,
compared with each other only. Runs under a RUN_DIR but under no bench directory form one protocol named
after the RUN_DIR. A protocol must hold at most one run per (task, budget, method, seed); a directory of
pilot runs that holds several (say LoRA at two learning rates) is split by the settings that tell them
apart ("explore: lr=0.001"), a run that those settings do not concern (LoRA under a lambda sweep) joining
every split it fits.

Statistics. Per (task, budget, method): mean and sample std over seeds of the task metric, at the final and
at the best epoch. Time ratios to LoRA: the median over seeds of (method's time / LoRA's time with the same
seed, task and budget), from the total training time and from the median step time (the latter is more
robust to a busy machine but misses FW-LoRA's slower warm-up steps). Paired differences over seeds with a
Student t 95 % interval; pooled per task over budgets (pairs = budget x seed).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import statistics
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fwlora import analysis
from fwlora.errors import UserError
from fwlora.files import read_json, write_json, write_text_atomic

log = logging.getLogger(__name__)

METHODS = ("lora", "adalora", "fwlora")
LABEL = {"lora": "LoRA", "adalora": "AdaLoRA", "fwlora": "FW-LoRA"}
COLOUR = {"lora": "tab:blue", "adalora": "tab:orange", "fwlora": "tab:green"}
# line style and marker per method, so that two methods with equal numbers stay visible on top of each other
STYLE = {"lora": ("-", "o"), "adalora": ("--", "s"), "fwlora": (":", "^")}
PAIRS = (("adalora", "lora"), ("fwlora", "lora"), ("fwlora", "adalora"))
CONFIDENCE = 0.95

# METHOD.md's hypotheses on time (ratios to plain LoRA). "Within ~1 %" is read as at most 1.02x: the
# hypothesised 1.01x plus one point for the "~" and for timing noise.
FW_TIME_HYPOTHESIS = 1.01
FW_TIME_LIMIT = 1.02
ADALORA_TIME_HYPOTHESIS = 1.12
ADALORA_TIME_TOLERANCE = 0.05  # |ratio - 1.12| <= this counts as "close to the hypothesis"

# METHOD.md's protocol; a run that differs from it is reported under "Reduced protocol".
REFERENCE_PROTOCOL: dict[str, Any] = {"epochs": 3, "train_limit": None, "eval_limit": None, "model": "roberta-base",
                                      "lr": 2e-4, "batch_size": 32, "warmup_ratio": 0.06}

# Config keys that say nothing about how a result was obtained (or are the grid's own coordinates).
COORDINATE_KEYS = {"task", "method", "seed", "rank", "budget"}
IGNORED_KEYS = COORDINATE_KEYS | {"output_dir", "data_dir", "threads", "log_every", "eval_batch_size"}
# The settings shown in a protocol's header (others appear when they differ between runs).
HEADER_KEYS = ("model", "head", "epochs", "lr", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
               "max_grad_norm", "max_length", "train_limit", "eval_limit", "lora_alpha", "lora_dropout",
               "mixed_precision", "target_modules")
FW_KEYS = ("lambda_fw", "fw_warmup_steps", "fw_beta", "fw_estimator", "fw_sketch_size", "fw_measure_every",
           "fw_normalization")

RESULT_FILE, CONFIG_FILE, BENCH_FILE = "result.json", "config.json", "bench.json"
_BUDGET_PART = re.compile(r"^(r\d+|b\d+(?:\.\d+)?(?:e-?\d+)?)$")
_SKIP_DIRS = {"checkpoint", "checkpoint.tmp", "checkpoint.old", "adapter", "report"}


# ---- statistics (pure) -----------------------------------------------------------------------------


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n - 1); std is None with fewer than two values."""
    v = _finite(values)
    return {"n": len(v), "mean": statistics.fmean(v) if v else None,
            "std": statistics.stdev(v) if len(v) > 1 else None}


def paired_ci(diffs: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float | None]:
    """Mean of paired differences with its Student t interval: mean +- t_{(1+c)/2, n-1} sd / sqrt(n).

    With one pair there is no interval (low/high None); with none, mean is None too.
    """
    from scipy.stats import t as student_t

    d = _finite(diffs)
    n = len(d)
    out: dict[str, float | None] = {"n": n, "mean": statistics.fmean(d) if d else None, "sd": None,
                                    "low": None, "high": None, "t_quantile": None, "confidence": confidence}
    if n > 1:
        sd = statistics.stdev(d)
        q = float(student_t.ppf(0.5 + confidence / 2, n - 1))
        half = q * sd / math.sqrt(n)
        out.update(sd=sd, t_quantile=q, low=out["mean"] - half, high=out["mean"] + half)
    return out


def per_seed_ratios(numerator: dict[Any, float | None], denominator: dict[Any, float | None]) -> dict[Any, float]:
    """{key: numerator / denominator} over the keys both have with usable (positive, finite) values."""
    out = {}
    for key, num in numerator.items():
        den = denominator.get(key)
        if num is not None and den is not None and math.isfinite(num) and math.isfinite(den) and den > 0:
            out[key] = num / den
    return out


def median_ratio(numerator: dict[Any, float | None], denominator: dict[Any, float | None]) -> dict[str, Any]:
    """The median of per-seed ratios (a pair is the same seed, task and budget: fair to a machine whose
    speed drifts between seeds), with the ratios themselves."""
    ratios = per_seed_ratios(numerator, denominator)
    return {"median": statistics.median(ratios.values()) if ratios else None, "n": len(ratios),
            "min": min(ratios.values()) if ratios else None, "max": max(ratios.values()) if ratios else None,
            "ratios": {str(k): v for k, v in ratios.items()}}


def difference_verdict(ci: dict[str, Any], a: str, b: str, unit: str = "seeds") -> str:
    """What a paired interval of (a - b) allows one to say at its confidence level."""
    n = ci["n"]
    level = f"{100 * ci.get('confidence', CONFIDENCE):g} %"
    if n == 0:
        return f"no paired {unit}: nothing to compare"
    if n == 1:
        return f"n/a (1 paired {unit[:-1] if unit.endswith('s') else unit}: no interval)"
    if ci["low"] > 0:
        return f"{a} better than {b} at {level} ({n} {unit})"
    if ci["high"] < 0:
        return f"{a} worse than {b} at {level} ({n} {unit})"
    return f"no difference detectable at {level} with {n} {unit}"


def fw_time_verdict(ratio: float | None, limit: float = FW_TIME_LIMIT) -> str:
    """METHOD.md: FW-LoRA's training time within ~1 % of LoRA's."""
    if ratio is None:
        return "no pairs with LoRA"
    return "met" if ratio <= limit else "not met"


def adalora_time_verdict(ratio: float | None, hypothesis: float = ADALORA_TIME_HYPOTHESIS,
                         tolerance: float = ADALORA_TIME_TOLERANCE) -> str:
    if ratio is None:
        return "no pairs with LoRA"
    if abs(ratio - hypothesis) <= tolerance:
        return "close to it"
    return "faster than that" if ratio < hypothesis else "slower than that"


# ---- formatting ------------------------------------------------------------------------------------


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _ok(x) else "—"


def fmt_signed(x: Any, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if _ok(x) else "—"


def fmt_ratio(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}x" if _ok(x) else "—"


def fmt_ci(ci: dict[str, Any], digits: int = 3) -> str:
    if not ci or ci.get("n", 0) == 0:
        return "—"
    if ci["n"] == 1:
        return f"{fmt_signed(ci['mean'], digits)} [n/a, 1 pair]"
    return f"{fmt_signed(ci['mean'], digits)} [{fmt_signed(ci['low'], digits)}, {fmt_signed(ci['high'], digits)}]"


def fmt_mean_std(s: dict[str, Any], digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "—"
    if s.get("std") is None:
        return f"{fmt(s['mean'], digits)} (1 seed)"
    return f"{fmt(s['mean'], digits)} ± {fmt(s['std'], digits)}"


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    return "none" if v is None else str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "protocol"


# ---- reading run directories -----------------------------------------------------------------------


@dataclass
class Run:
    """One run directory as found on disk. `result` is set only for a complete run."""

    path: Path
    status: str  # complete | failed | interrupted | running | unreadable
    task: str
    method: str
    seed: int
    budget_label: str
    config: dict[str, Any]
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.task, self.budget_label, self.method, self.seed


@dataclass
class Protocol:
    """Runs compared with each other: one bench directory, or the loose runs under one RUN_DIR."""

    label: str
    root: Path
    runs: list[Run]
    bench: dict[str, Any] | None = None
    expected: set[tuple[str, str, str, int]] = field(default_factory=set)  # from bench.json's list of runs
    split: dict[str, Any] = field(default_factory=dict)  # settings that tell this split of a directory apart
    notes: list[str] = field(default_factory=list)


def budget_label_of(path_parts: Sequence[str], config: dict[str, Any]) -> str:
    """The bench layout's path component ("r2", "b0.2"); else from the config's rank or budget (the
    trainer's default budget is 0.2 %)."""
    for part in reversed(path_parts):
        if _BUDGET_PART.match(part):
            return part
    if config.get("rank") is not None:
        return f"r{config['rank']}"
    if config.get("budget") is not None:
        return f"b{float(config['budget']):g}"
    return "b0.2"


def budget_sort_key(label: str) -> tuple[str, float]:
    try:
        return label[0], float(label[1:])
    except (ValueError, IndexError):
        return label, 0.0


def _run_dirs(root: Path) -> list[Path]:
    """Directories holding result.json or config.json, not descending into run directories."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if RESULT_FILE in filenames or CONFIG_FILE in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    return sorted(found)


def load_run(run_dir: Path, root: Path) -> Run | None:
    """Read one run directory; None when it holds nothing a report can use (logged)."""
    parts = run_dir.relative_to(root).parts if run_dir != root else ()
    result_path, config_path = run_dir / RESULT_FILE, run_dir / CONFIG_FILE
    result: dict[str, Any] | None = None
    error = None
    if result_path.is_file():
        try:
            result = read_json(result_path)
            status = result.get("status", "unknown") if isinstance(result, dict) else "unreadable"
        except (OSError, ValueError) as e:
            status, error, result = "unreadable", f"cannot read {result_path}: {e}", None
    else:
        status = "running"  # config.json only: started, not finished (or killed without a trace)
    config: dict[str, Any] = {}
    if isinstance(result, dict) and isinstance(result.get("config"), dict):
        config = result["config"]
    elif config_path.is_file():
        try:
            config = read_json(config_path).get("config") or {}
        except (OSError, ValueError, AttributeError) as e:
            log.warning("skipping %s: cannot read %s (%s)", run_dir, config_path, e)
            return None
    src = result if isinstance(result, dict) else {}
    task, method, seed = src.get("task") or config.get("task"), src.get("method") or config.get("method"), \
        src.get("seed", config.get("seed"))
    if not task or not method or seed is None:
        log.warning("skipping %s: cannot tell its task, method and seed", run_dir)
        return None
    if status == "failed":
        error = str(src.get("error") or "failed (no message)")
    if status == "complete":
        try:
            _check_complete(src)
        except (KeyError, TypeError, ValueError) as e:
            status, error = "unreadable", f"result.json lacks {e}"
    return Run(path=run_dir, status=status, task=str(task), method=str(method), seed=int(seed),
               budget_label=budget_label_of(parts, config), config=config,
               result=src if status == "complete" else None, error=error)


def _check_complete(result: dict[str, Any]) -> None:
    metric = result["metric"]
    float(result["final"][metric])
    float(result["best"][metric])
    result["timing"]["train_seconds"]


def _hashable(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def _relevant(method: str, key: str) -> bool:
    """Whether a setting can change a run of this method (FW-LoRA's and AdaLoRA's own settings do not
    change the other methods' runs)."""
    if key.startswith("fw_") or key in ("lambda_fw", "allow_late_penalty"):
        return method == "fwlora"
    if key.startswith("adalora_"):
        return method == "adalora"
    return True


def split_by_settings(runs: list[Run]) -> list[tuple[dict[str, Any], list[Run]]]:
    """Split runs so that each part holds at most one run per (task, budget, method, seed).

    The settings used are those that differ between runs sharing such a key; a run that a setting does
    not concern (LoRA and lambda_fw) joins every part it agrees with. Returns [(settings, runs)].
    """
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.key].append(r)
    keys = sorted({k for g in groups.values() if len(g) > 1 for r in g for k in r.config
                   if k not in IGNORED_KEYS and _relevant(r.method, k)
                   and len({_hashable(x.config.get(k)) for x in g}) > 1})
    if not keys:
        return [({}, runs)]

    def assignment(r: Run) -> frozenset:
        return frozenset((k, _hashable(r.config.get(k))) for k in keys if _relevant(r.method, k))

    candidates = {assignment(r) for r in runs}
    maximal = [a for a in candidates if not any(a < b for b in candidates)]
    out = []
    for a in sorted(maximal, key=lambda s: sorted(s)):
        members = [r for r in runs if assignment(r) <= a]
        settings = {k: json.loads(v) for k, v in sorted(a)}
        out.append((settings, members))
    return out


def _dedupe(runs: list[Run], notes: list[str]) -> list[Run]:
    """One run per key: prefer a complete one, then the first by path; say what was left out."""
    rank = {"complete": 0, "failed": 1, "unreadable": 2, "interrupted": 3, "running": 4}
    by_key: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        by_key[r.key].append(r)
    kept = []
    for key, group in by_key.items():
        group.sort(key=lambda r: (rank.get(r.status, 5), str(r.path)))
        kept.append(group[0])
        for other in group[1:]:
            notes.append(f"{other.path} repeats {'/'.join(map(str, key))} with the same settings; "
                         f"{group[0].path} is used")
    return sorted(kept, key=lambda r: str(r.path))


def _bench_expected(bench: dict[str, Any]) -> set[tuple[str, str, str, int]]:
    out = set()
    for key in bench.get("runs") or []:
        parts = str(key).split("/")
        if len(parts) == 4 and parts[3].startswith("seed"):
            try:
                out.add((parts[0], parts[1], parts[2], int(parts[3][4:])))
            except ValueError:
                pass
    return out


def _bench_label(bench_dir: Path, bench: dict[str, Any]) -> str:
    source = (bench.get("preset") or {}).get("source") if isinstance(bench.get("preset"), dict) else None
    name = bench_dir.resolve().name
    if source and source.startswith("preset "):
        return f"{name} (preset {source.removeprefix('preset ')})"
    if source and source != "command line":
        return f"{name} (preset file {Path(source).name})"
    return name


def discover(run_dirs: Sequence[Path]) -> list[Protocol]:
    """Every run under the given directories, grouped into protocols (see the module docstring)."""
    protocols: list[Protocol] = []
    seen: set[Path] = set()
    for arg in run_dirs:
        arg = Path(arg)
        if not arg.exists():
            raise UserError(f"{arg} does not exist (give run directories or bench directories written by "
                            "`fwlora train` / `fwlora bench`)")
        if arg.is_file():
            if arg.name != RESULT_FILE:
                raise UserError(f"{arg} is a file: give a run directory or a bench directory")
            arg = arg.parent
        benches = sorted({p.parent for p in arg.rglob(BENCH_FILE)} | ({arg} if (arg / BENCH_FILE).is_file() else set()),
                         key=lambda p: len(p.parts), reverse=True)
        groups: dict[Path, list[Run]] = defaultdict(list)
        for d in _run_dirs(arg):
            resolved = d.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            run = load_run(d, arg)
            if run is None:
                continue
            home = next((b for b in benches if b == d or b in d.parents), arg)
            if home != arg:
                run.budget_label = budget_label_of(d.relative_to(home).parts, run.config)
            groups[home].append(run)
        for home in sorted(set(groups) | set(benches), key=str):
            bench = None
            if (home / BENCH_FILE).is_file():
                try:
                    bench = read_json(home / BENCH_FILE)
                except (OSError, ValueError) as e:
                    log.warning("cannot read %s: %s", home / BENCH_FILE, e)
            base = _bench_label(home, bench) if bench else (home.resolve().name or str(home))
            parts = split_by_settings(groups.get(home, []))
            for settings, members in parts:
                notes: list[str] = []
                label = base
                if settings:
                    label += ": " + ", ".join(f"{k}={fmt_value(v)}" for k, v in settings.items())
                    notes.append(f"{home} holds several runs per task, budget, method and seed; they are split by "
                                 f"{', '.join(settings)}. This part has " +
                                 ", ".join(f"{k} = {fmt_value(v)}" for k, v in settings.items()) +
                                 " (a setting that does not concern a method leaves its runs in every part).")
                expected = _bench_expected(bench) if bench else set()
                if settings:  # a bench's list of runs cannot be split by setting: do not expect runs it may not hold
                    expected = set()
                protocols.append(Protocol(label=label, root=home, runs=_dedupe(members, notes), bench=bench,
                                          expected=expected, split=settings, notes=notes))
    labels: dict[str, int] = defaultdict(int)
    for p in protocols:
        labels[p.label] += 1
        if labels[p.label] > 1:
            p.label += f" ({labels[p.label]})"
    return protocols


# ---- aggregation -----------------------------------------------------------------------------------


def _metric(result: dict[str, Any], which: str) -> float | None:
    v = (result.get(which) or {}).get(result.get("metric"))
    return float(v) if _ok(v) else None


def _timing(result: dict[str, Any], key: str) -> float | None:
    v = (result.get("timing") or {}).get(key)
    return float(v) if _ok(v) else None


def seeds_text(stat: dict[str, Any]) -> str:
    """'3/3 seeds', '2/3 seeds, 1 failed', '0/3 seeds, 2 running, 1 missing'."""
    text = f"{stat['complete']}/{stat['expected']} seed{'s' if stat['expected'] != 1 else ''}"
    extra = [f"{stat[k]} {k}" for k in ("failed", "running", "interrupted", "unreadable", "missing") if stat.get(k)]
    return text + (", " + ", ".join(extra) if extra else "")


def method_stats(runs: dict[int, Run], expected_seeds: Sequence[int], lora: dict[int, Run] | None) -> dict[str, Any]:
    """Per (task, budget, method): seeds done, metric mean/std (final, best), parameters, time and time
    ratios to LoRA (median of per-seed ratios)."""
    complete = {s: r.result for s, r in runs.items() if r.status == "complete"}
    counts = defaultdict(int)
    for r in runs.values():
        if r.status != "complete":
            counts[r.status if r.status in ("failed", "running", "interrupted", "unreadable") else "unreadable"] += 1
    expected = sorted(set(expected_seeds) | set(runs))
    counts["missing"] = len([s for s in expected if s not in runs])
    stat: dict[str, Any] = {"expected": len(expected), "complete": len(complete), **counts,
                            "seeds_complete": sorted(complete),
                            "errors": {str(s): r.error for s, r in runs.items() if r.error}}
    stat["seeds_text"] = seeds_text(stat)
    final = {s: _metric(r, "final") for s, r in complete.items()}
    best = {s: _metric(r, "best") for s, r in complete.items()}
    stat["final_by_seed"] = {str(s): v for s, v in final.items()}
    stat["final"] = mean_std(list(final.values()))
    stat["best"] = mean_std(list(best.values()))
    stat["best_epoch"] = mean_std([(r.get("best") or {}).get("epoch") for r in complete.values()])
    train = {s: _timing(r, "train_seconds") for s, r in complete.items()}
    step = {s: _timing(r, "step_seconds_median") for s, r in complete.items()}
    stat["train_seconds"] = mean_std(list(train.values()))
    stat["step_seconds_median"] = mean_std(list(step.values()))
    if complete:
        first = complete[min(complete)]
        b = first.get("budget") or {}
        backbone = b.get("backbone_params")
        adapter = b.get("adapter_trainable_params")
        stat.update(rank=b.get("rank"), lora_percent=b.get("percent"), adapter_params=adapter,
                    head_params=b.get("head_params"), backbone_params=backbone,
                    actual_percent=100.0 * adapter / backbone if adapter and backbone else None,
                    metric=first.get("metric"))
        if first.get("adalora"):
            stat["adalora"] = first["adalora"]
            stat["adalora_final_total_rank"] = mean_std([(r.get("adalora") or {}).get("final_total_rank")
                                                         for r in complete.values()])
        if first.get("method") == "fwlora":
            stat["fw_warmup_step_seconds_median"] = mean_std([_timing(r, "fw_warmup_step_seconds_median") for r in complete.values()])
            stat["fw_after_warmup_step_seconds_median"] = mean_std(
                [_timing(r, "fw_after_warmup_step_seconds_median") for r in complete.values()])
    if lora is not None:
        lora_done = {s: r.result for s, r in lora.items() if r.status == "complete"}
        stat["time_ratio"] = median_ratio(train, {s: _timing(r, "train_seconds") for s, r in lora_done.items()})
        stat["step_ratio"] = median_ratio(step, {s: _timing(r, "step_seconds_median") for s, r in lora_done.items()})
    return stat


def _curve(results: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Metric per epoch, mean and std over seeds (epochs a run does not have are left out of its mean)."""
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in results:
        for e in r.get("epochs") or []:
            v = e.get(r.get("metric"))
            if _ok(v) and e.get("epoch") is not None:
                per_epoch[int(e["epoch"])].append(float(v))
    epochs = sorted(per_epoch)
    stats = [mean_std(per_epoch[e]) for e in epochs]
    return {"epoch": epochs, "mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats],
            "n": [s["n"] for s in stats]}


def _by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in result.get("matrices") or [] if m.get("name")}


def matrix_question(fw: dict[int, dict], lora: dict[int, dict], ada: dict[int, dict]) -> dict[str, Any]:
    """METHOD.md's first open question for one (task, budget): does the (1 - I_m) weighting reallocate
    the budget, or is it a near-uniform decay on dW? Numbers from FW-LoRA's I_m and from ‖dW_m‖
    matched by matrix name with LoRA's run of the same seed (AdaLoRA's shift given as a reference for a
    method that does reallocate)."""
    out: dict[str, Any] = {"fw_runs": len(fw)}
    per_run_i, per_run_w = [], []
    for res in fw.values():
        imp = [m.get("importance") for m in res.get("matrices") or []]
        imp = _finite(imp)
        if imp:
            per_run_i.append(analysis.spread(imp) | {"max_over_min": max(imp) / min(imp) if min(imp) > 0 else None,
                                                     "matrices": len(imp)})
            per_run_w.append(analysis.uniformity_of_weights(imp))
    if per_run_i:
        keys_i = ("min", "median", "max", "max_over_min", "matrices")
        out["importance"] = {k: statistics.fmean(_finite([s.get(k) for s in per_run_i]) or [float("nan")]) for k in keys_i}
        out["importance"]["uniform"] = 1.0 / out["importance"]["matrices"] if out["importance"]["matrices"] else None
        out["weights"] = {k: statistics.fmean(_finite([s.get(k) for s in per_run_w]) or [float("nan")])
                          for k in ("min", "median", "max", "relative_range")}
        out["weights"]["relative_range_by_seed"] = [s.get("relative_range") for s in per_run_w]

    def shifts(other: dict[int, dict]) -> dict[str, Any]:
        rows = []
        for seed in sorted(set(other) & set(lora)):
            a, b = _by_name(lora[seed]), _by_name(other[seed])
            names = [n for n in a if n in b]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = analysis.log_norm_shift([a[n].get("fro_norm") or 0.0 for n in names],
                                            [b[n].get("fro_norm") or 0.0 for n in names])
            s["seed"] = seed
            if other is fw:
                s.update({f"importance_{k}": v for k, v in analysis.importance_shrink_correlation(
                    [b[n].get("importance") for n in names], [a[n].get("fro_norm") for n in names],
                    [b[n].get("fro_norm") for n in names]).items()})
            rows.append(s)
        if not rows:
            return {"pairs": 0}
        agg = {"pairs": len(rows), "by_seed": rows}
        for k in ("mean_log_ratio", "std_log_ratio", "geometric_mean_ratio", "spearman", "importance_spearman"):
            vals = _finite([r.get(k) for r in rows])
            if vals:
                agg[k] = statistics.fmean(vals)
        return agg

    out["fw_vs_lora"] = shifts(fw)
    out["adalora_vs_lora"] = shifts(ada)
    out["effective_rank"] = {}
    for method, runs in (("lora", lora), ("adalora", ada), ("fwlora", fw)):
        vals = [m.get("effective_rank") for r in runs.values() for m in r.get("matrices") or []]
        if _finite(vals):
            out["effective_rank"][method] = analysis.spread(_finite(vals))
    ranks = [[m.get("adalora_rank") for m in r.get("matrices") or []] for r in ada.values()]
    ranks = [_finite(r) for r in ranks if _finite(r)]
    if ranks:
        flat = [v for r in ranks for v in r]
        out["adalora_rank"] = analysis.spread(flat) | {
            "zero_fraction": sum(v == 0 for v in flat) / len(flat),
            "total_mean": statistics.fmean(sum(r) for r in ranks), "matrices": len(ranks[0])}
    return out


def summarise_protocol(p: Protocol) -> dict[str, Any]:
    """Every number of one protocol's tables, as plain data (what summary.json holds)."""
    by: dict[tuple[str, str], dict[str, dict[int, Run]]] = defaultdict(lambda: defaultdict(dict))
    for r in p.runs:
        by[(r.task, r.budget_label)][r.method][r.seed] = r
    for task, label, _method, _seed in p.expected:
        by[(task, label)]  # a cell the bench planned but that holds nothing yet
    methods = [m for m in METHODS if any(m in v for v in by.values()) or any(e[2] == m for e in p.expected)]
    methods += sorted({r.method for r in p.runs} - set(methods))
    tasks = _ordered_tasks(p)
    cells = []
    for task in tasks:
        for label in sorted({lb for (t, lb) in by if t == task}, key=budget_sort_key):
            runs = by[(task, label)]
            seeds = {s for m in runs.values() for s in m} | {e[3] for e in p.expected if e[:2] == (task, label)}
            stats = {}
            for m in methods:
                exp = {e[3] for e in p.expected if e[:3] == (task, label, m)} if p.expected else seeds
                if not runs.get(m) and not exp:
                    continue
                stats[m] = method_stats(runs.get(m, {}), sorted(exp),
                                        runs.get("lora") if m != "lora" and "lora" in methods else None)
            done = {m: {s: r.result for s, r in runs.get(m, {}).items() if r.status == "complete"} for m in methods}
            pairs = {}
            for a, b in PAIRS:
                if a in methods and b in methods:
                    common = sorted(set(done[a]) & set(done[b]))
                    diffs = [_metric(done[a][s], "final") - _metric(done[b][s], "final") for s in common]
                    pairs[f"{a}-{b}"] = paired_ci(diffs) | {"seeds": common, "diffs": diffs}
            any_done = next((r for m in done.values() for r in m.values()), None)
            cell = {"task": task, "budget_label": label,
                    "metric": any_done.get("metric") if any_done else task_metric(task),
                    "rank": next((s.get("rank") for s in stats.values() if s.get("rank")), None),
                    "lora_percent": next((s.get("lora_percent") for s in stats.values() if s.get("lora_percent")), None),
                    "methods": stats, "pairs": pairs,
                    "curves": {m: _curve(list(done[m].values())) for m in methods if done[m]},
                    "matrices": matrix_question(done.get("fwlora", {}), done.get("lora", {}), done.get("adalora", {}))}
            cell["verdicts"] = cell_verdicts(cell)
            cells.append(cell)
    return {"label": p.label, "root": str(p.root), "split": p.split, "notes": p.notes, "methods": methods,
            "tasks": tasks, "cells": cells, "pooled": pooled(cells, methods), "settings": protocol_settings(p),
            "env": protocol_env(p), "bench": _bench_header(p),
            "counts": dict(sorted(_count_status(p).items()))}


def task_metric(task: str) -> str | None:
    """The task's metric when no complete run says it (mcc for CoLA, accuracy otherwise)."""
    try:
        from fwlora.data import task_spec

        return task_spec(task).metric
    except Exception:  # an unknown task name in a hand-made directory: say nothing rather than fail
        return None


def _ordered_tasks(p: Protocol) -> list[str]:
    order = []
    for key in (p.bench or {}).get("runs") or []:
        task = str(key).split("/")[0]
        if task not in order:
            order.append(task)
    return [t for t in order if any(r.task == t for r in p.runs) or any(e[0] == t for e in p.expected)] + \
        sorted({r.task for r in p.runs} - set(order))


def _count_status(p: Protocol) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in p.runs:
        counts[r.status] += 1
    have = {r.key for r in p.runs}
    counts["missing"] = len([e for e in p.expected if e not in have])
    return counts


def cell_verdicts(cell: dict[str, Any]) -> list[str]:
    """One line per comparison and per time hypothesis, computed from the intervals and ratios."""
    lines = []
    stats, pairs = cell["methods"], cell["pairs"]
    for a, b in PAIRS:
        ci = pairs.get(f"{a}-{b}")
        if ci is None:
            continue
        lines.append(f"{LABEL[a]} − {LABEL[b]}: {fmt_ci(ci)}: {difference_verdict(ci, LABEL[a], LABEL[b])}")
    fw = stats.get("fwlora", {})
    if "fwlora-adalora" in pairs or "time_ratio" in fw:
        ci = pairs.get("fwlora-adalora", {"n": 0})
        tr = (fw.get("time_ratio") or {}).get("median")
        sr = (fw.get("step_ratio") or {}).get("median")
        head = (f"FW-LoRA vs AdaLoRA: {fmt_ci(ci)}: {difference_verdict(ci, 'FW-LoRA', 'AdaLoRA')}"
                if "fwlora-adalora" in pairs else "FW-LoRA vs AdaLoRA: no AdaLoRA runs")
        lines.append(f"**Verdict**: {head}; FW-LoRA time {fmt_ratio(tr, 3)} LoRA "
                     f"(median step {fmt_ratio(sr, 3)}; hypothesis: ~{FW_TIME_HYPOTHESIS:g}x, met if <= "
                     f"{FW_TIME_LIMIT:g}x): {fw_time_verdict(tr)}")
    if fw.get("complete") and (fw.get("fw_warmup_step_seconds_median") or {}).get("mean") is not None:
        lora_step = (stats.get("lora") or {}).get("step_seconds_median", {}).get("mean")
        lines.append(f"FW-LoRA median step: {fmt(fw['fw_warmup_step_seconds_median']['mean'], 4)} s during the "
                     f"Fisher warm-up, {fmt((fw.get('fw_after_warmup_step_seconds_median') or {}).get('mean'), 4)} s "
                     f"after it (LoRA: {fmt(lora_step, 4)} s)")
    ada = stats.get("adalora", {})
    if "time_ratio" in ada:
        tr = ada["time_ratio"]["median"]
        lines.append(f"AdaLoRA time {fmt_ratio(tr, 3)} LoRA (median step {fmt_ratio(ada['step_ratio']['median'], 3)}; "
                     f"hypothesis: ~{ADALORA_TIME_HYPOTHESIS:g}x): {adalora_time_verdict(tr)}")
    return lines


def pooled(cells: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per task, over all its budgets: paired differences with pairs = budget x seed, and the median of
    all per-(budget, seed) time ratios."""
    out = {}
    for task in dict.fromkeys(c["task"] for c in cells):
        mine = [c for c in cells if c["task"] == task]
        entry: dict[str, Any] = {"budgets": [c["budget_label"] for c in mine]}
        for a, b in PAIRS:
            diffs = [d for c in mine for d in (c["pairs"].get(f"{a}-{b}") or {}).get("diffs", [])]
            if a in methods and b in methods:
                ci = paired_ci(diffs)
                entry[f"{a}-{b}"] = ci | {"verdict": difference_verdict(ci, LABEL[a], LABEL[b], unit="pairs")}
        for m in ("adalora", "fwlora"):
            for kind in ("time_ratio", "step_ratio"):
                ratios = [v for c in mine for v in ((c["methods"].get(m) or {}).get(kind) or {}).get("ratios", {}).values()]
                if ratios:
                    entry[f"{m}_{kind}"] = {"median": statistics.median(ratios), "n": len(ratios)}
        out[task] = entry
    return out


def pooled_lines(task: str, entry: dict[str, Any]) -> list[str]:
    lines = []
    for a, b in PAIRS:
        ci = entry.get(f"{a}-{b}")
        if ci is not None:
            lines.append(f"{LABEL[a]} − {LABEL[b]}: {fmt_ci(ci)}: {ci['verdict']}")
    fw = entry.get("fwlora_time_ratio")
    if fw:
        lines.append(f"FW-LoRA time {fmt_ratio(fw['median'], 3)} LoRA over {fw['n']} pairs (median step "
                     f"{fmt_ratio((entry.get('fwlora_step_ratio') or {}).get('median'), 3)}; hypothesis "
                     f"~{FW_TIME_HYPOTHESIS:g}x): {fw_time_verdict(fw['median'])}")
    ada = entry.get("adalora_time_ratio")
    if ada:
        lines.append(f"AdaLoRA time {fmt_ratio(ada['median'], 3)} LoRA over {ada['n']} pairs (hypothesis "
                     f"~{ADALORA_TIME_HYPOTHESIS:g}x): {adalora_time_verdict(ada['median'])}")
    return lines


# ---- settings and environment ----------------------------------------------------------------------


def reduced_protocol(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Settings that differ from METHOD.md's protocol, with the values found (and how many runs)."""
    out = []
    for key, ref in REFERENCE_PROTOCOL.items():
        values: dict[str, int] = defaultdict(int)
        for c in configs:
            v = c.get(key)
            same = (v is None and ref is None) or (v is not None and ref is not None and
                                                   (v == ref if not isinstance(ref, float) else math.isclose(float(v), ref)))
            if not same:
                values[fmt_value(v)] += 1
        if values:
            found = ", ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in sorted(values.items()))
            out.append(f"{key} = {found} (METHOD.md: {fmt_value(ref) if ref is not None else 'not set'})")
    return out


def protocol_settings(p: Protocol) -> dict[str, Any]:
    """The settings shared by every run, those that differ between methods, each method's own, and the
    differences from METHOD.md's protocol."""
    configs_by_method: dict[str, list[dict]] = defaultdict(list)
    for r in p.runs:
        configs_by_method[r.method].append(r.config)
    order = {m: i for i, m in enumerate(METHODS)}
    configs_by_method = dict(sorted(configs_by_method.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    all_configs = [c for cs in configs_by_method.values() for c in cs]
    keys = sorted({k for c in all_configs for k in c} - IGNORED_KEYS)
    shared, per_method, varying = {}, {}, {}
    for k in keys:
        relevant = {m: cs for m, cs in configs_by_method.items() if _relevant(m, k)}
        values = {m: sorted({_hashable(c.get(k)) for c in cs}) for m, cs in relevant.items()}
        flat = {v for vs in values.values() for v in vs}
        if not flat:
            continue
        if len(flat) == 1:
            value = json.loads(next(iter(flat)))
            if k in HEADER_KEYS and (value is not None or k in REFERENCE_PROTOCOL):
                shared[k] = value
        elif all(len(v) == 1 for v in values.values()):
            per_method[k] = {m: json.loads(v[0]) for m, v in values.items()}
        else:
            varying[k] = {m: [json.loads(x) for x in v] for m, v in values.items()}
    own = {}
    if "fwlora" in configs_by_method:
        own["fwlora"] = {k: sorted({_hashable(c.get(k)) for c in configs_by_method["fwlora"]}) for k in FW_KEYS}
        own["fwlora"] = {k: [json.loads(x) for x in v] for k, v in own["fwlora"].items()}
    ada = [r.result.get("adalora") for r in p.runs if r.method == "adalora" and r.result and r.result.get("adalora")]
    if ada:
        own["adalora"] = {k: sorted({_hashable(a.get(k)) for a in ada})
                          for k in ("init_r", "target_r", "lora_alpha", "total_step", "tinit", "tfinal", "deltaT",
                                    "orth_reg_weight", "beta1", "beta2")}
        own["adalora"] = {k: [json.loads(x) for x in v] for k, v in own["adalora"].items()}
    lora_alpha = {m: sorted({(r.result.get("budget") or {}).get("lora_alpha") for r in p.runs
                             if r.method == m and r.result}, key=str) for m in configs_by_method}
    data = sorted({json.dumps({k: (r.result.get("data") or {}).get(k) for k in ("source", "train_examples", "eval_examples")},
                              sort_keys=True) for r in p.runs if r.result})
    return {"shared": shared, "per_method": per_method, "varying": varying, "own": own,
            "lora_alpha": {m: v for m, v in lora_alpha.items() if v}, "data": [json.loads(d) for d in data],
            "reduced": reduced_protocol(all_configs)}


def protocol_env(p: Protocol) -> dict[str, Any]:
    """Distinct package versions, git commits and machines the runs report (with how many runs each)."""
    out: dict[str, dict[str, int]] = {"packages": defaultdict(int), "git": defaultdict(int), "machine": defaultdict(int)}
    for r in p.runs:
        env = (r.result or {}).get("env")
        if not env:
            continue
        pk = env.get("packages") or {}
        out["packages"][", ".join(f"{k} {v}" for k, v in pk.items() if v)] += 1
        commit = env.get("git_commit")
        out["git"][(commit or "unknown (not a git checkout)") + (" (dirty)" if env.get("git_dirty") else "")] += 1
        out["machine"][f"{env.get('cuda_device') or 'CPU'}, python {env.get('python')}, "
                       f"{env.get('torch_threads')} torch threads, {env.get('platform')}"] += 1
    return {k: dict(v) for k, v in out.items()}


def _bench_header(p: Protocol) -> dict[str, Any]:
    if p.bench:
        return {"command": p.bench.get("command"), "set": p.bench.get("set") or {},
                "preset": (p.bench.get("preset") or {}).get("source") if isinstance(p.bench.get("preset"), dict) else None}
    commands = sorted({(r.result or {}).get("env", {}).get("command") for r in p.runs if r.result} - {None})
    return {"commands": commands}


# ---- plots -----------------------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> Path:
    """Save a PNG atomically: a temporary name in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas for PNGs

    return Figure(figsize=(w, h), layout="constrained")


def _budget_tick(cell: dict[str, Any]) -> str:
    pct = cell.get("lora_percent")
    return cell["budget_label"] + (f"\n{pct:.2f} %" if _ok(pct) else "")


def plot_metric_vs_budget(summary: dict[str, Any], path: Path) -> Path | None:
    tasks = summary["tasks"]
    if not any(c["curves"] for c in summary["cells"]):
        return None
    fig = _figure(max(5.5, 4.2 * len(tasks)), 3.4)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        cells = [c for c in summary["cells"] if c["task"] == task]
        x = np.arange(len(cells))
        for k, m in enumerate(summary["methods"]):
            ys = [((c["methods"].get(m) or {}).get("final") or {}) for c in cells]
            mean = np.array([s.get("mean") if s.get("mean") is not None else np.nan for s in ys], float)
            err = np.array([s.get("std") or 0.0 for s in ys], float)
            if np.isfinite(mean).any():
                ls, marker = STYLE.get(m, ("-", "o"))
                ax.errorbar(x + (k - 1) * 0.06, mean, yerr=err, marker=marker, ls=ls, capsize=3, label=LABEL.get(m, m),
                            color=COLOUR.get(m))
        ax.set_xticks(x, [_budget_tick(c) for c in cells])
        ax.set_xlabel("budget (rank, LoRA % of backbone)")
        ax.set_ylabel(f"final {cells[0]['metric'] or 'metric'} (mean ± std over seeds)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{summary['label']}: task metric at the final epoch vs budget", fontsize=10)
    return _save(fig, path)


def plot_time_ratios(summary: dict[str, Any], path: Path) -> Path | None:
    cells = summary["cells"]
    others = [m for m in ("adalora", "fwlora") if m in summary["methods"]]
    if not cells or not others or not any((c["methods"].get(m) or {}).get("time_ratio", {}).get("median")
                                          for c in cells for m in others):
        return None
    fig = _figure(max(7.0, 1.1 * len(cells) + 2), 6.4)
    axes = fig.subplots(2, 1, squeeze=False)[:, 0]
    x = np.arange(len(cells))
    width = 0.8 / len(others)
    for ax, kind, what in ((axes[0], "time_ratio", "training time"), (axes[1], "step_ratio", "median step time")):
        for k, m in enumerate(others):
            rs = [(c["methods"].get(m) or {}).get(kind) or {} for c in cells]
            med = np.array([r.get("median") or np.nan for r in rs], float)
            lo = np.array([r.get("min") or np.nan for r in rs], float)
            hi = np.array([r.get("max") or np.nan for r in rs], float)
            pos = x + (k - (len(others) - 1) / 2) * width
            ax.bar(pos, med, width, color=COLOUR.get(m), label=LABEL[m], alpha=0.85)
            ok = np.isfinite(med) & np.isfinite(lo) & np.isfinite(hi)
            ax.errorbar(pos[ok], med[ok], yerr=[med[ok] - lo[ok], hi[ok] - med[ok]], fmt="none", ecolor="black", capsize=3)
        ax.axhline(1.0, color="tab:blue", lw=1, label="LoRA")
        ax.axhline(FW_TIME_HYPOTHESIS, color="tab:green", ls="--", lw=1, label=f"FW-LoRA hypothesis {FW_TIME_HYPOTHESIS:g}x")
        ax.axhline(ADALORA_TIME_HYPOTHESIS, color="tab:orange", ls="--", lw=1,
                   label=f"AdaLoRA hypothesis {ADALORA_TIME_HYPOTHESIS:g}x")
        ax.set_xticks(x, [f"{c['task']}\n{c['budget_label']}" for c in cells])
        ax.set_ylabel(f"{what} / LoRA's")
        ax.set_title(f"{what}: median of per-seed ratios to LoRA\n(black bars: min to max over seeds)", fontsize=9)
        finite = [v for c in cells for m in others for v in [((c["methods"].get(m) or {}).get(kind) or {}).get("max")] if _ok(v)]
        ax.set_ylim(min(0.9, 0.95 * min(finite, default=1.0)), max(1.2, 1.05 * max(finite, default=1.0)))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{summary['label']}: time relative to LoRA", fontsize=10)
    return _save(fig, path)


def _matrix_means(results: Sequence[dict[str, Any]], key: str) -> dict[tuple[int | None, str], float]:
    """Mean over runs of one per-matrix field, by (layer, kind)."""
    acc: dict[tuple[int | None, str], list[float]] = defaultdict(list)
    for r in results:
        for m in r.get("matrices") or []:
            v = m.get(key)
            if _ok(v):
                acc[(m.get("layer"), m.get("kind") or m.get("name"))].append(float(v))
    return {k: statistics.fmean(v) for k, v in acc.items()}


def _heatmap(fig: Any, ax: Any, values: dict, title: str, cmap: str = "viridis", vmin: float | None = None,
             vmax: float | None = None, annotate: str | None = None, norm: Any = None) -> None:
    if not values:
        ax.set_axis_off()
        ax.set_title(title + "\n(no data)", fontsize=9)
        return
    layers, kinds, grid = analysis.layer_kind_grid(values)
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=None if norm else vmin, vmax=None if norm else vmax, norm=norm)
    ax.set_xticks(range(len(kinds)), [analysis.KIND_LABELS.get(k, k) for k in kinds], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), ["—" if v is None else str(v) for v in layers], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.85)
    if annotate and grid.size <= 120:
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    r, g, b, _ = im.cmap(im.norm(grid[i, j]))
                    ax.text(j, i, format(grid[i, j], annotate), ha="center", va="center", fontsize=7,
                            color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")


def _middle_cell(cells: list[dict[str, Any]], task: str, need: str | None = None) -> dict[str, Any] | None:
    """The middle budget of a task (the brief's 'one budget per task'), preferring one with `need` runs."""
    mine = [c for c in cells if c["task"] == task]
    if need:
        mine = [c for c in mine if (c["methods"].get(need) or {}).get("complete")] or mine
    return mine[len(mine) // 2] if mine else None


def plot_importance(cell: dict[str, Any], fw: Sequence[dict], label: str, path: Path) -> Path | None:
    values = _matrix_means(fw, "importance")
    if not values:
        return None
    from matplotlib.colors import LogNorm

    layers, kinds, grid = analysis.layer_kind_grid(values)
    fig = _figure(1.0 * len(kinds) + 3.0, 0.45 * len(layers) + 2.2)
    ax = fig.subplots()
    pct = {k: 100 * v for k, v in values.items()}
    low, high = min(pct.values()), max(pct.values())
    log_scale = low > 0 and high / low > 20  # a few large scores would leave every other cell black
    _heatmap(fig, ax, pct, f"FW-LoRA importance I_m in % (mean over {len(fw)} seed(s)); uniform = "
             f"{100 / len(values):.2f} %" + ("; log colour scale" if log_scale else ""),
             cmap="magma", annotate=".2f", norm=LogNorm(low, high) if log_scale else None)
    fig.suptitle(f"{label}: {cell['task']} {cell['budget_label']}", fontsize=10)
    return _save(fig, path)


def plot_matrices(cell: dict[str, Any], done: dict[str, list[dict]], label: str, path: Path) -> Path | None:
    """‖dW‖ and effective rank per matrix for the three methods side by side (shared colour scale per
    row), AdaLoRA's final rank pattern, and FW-LoRA's / LoRA's ‖dW‖ per matrix."""
    from matplotlib.colors import TwoSlopeNorm

    methods = [m for m in METHODS if done.get(m)]
    if not methods:
        return None
    norms = {m: _matrix_means(done[m], "fro_norm") for m in methods}
    ranks = {m: _matrix_means(done[m], "effective_rank") for m in methods}
    some = next(iter(norms.values()))
    layers, kinds, _ = analysis.layer_kind_grid(some or {(0, "?"): 0.0})
    fig = _figure(4 * 3.3, 2 * (0.3 * len(layers) + 2.0))
    axes = fig.subplots(2, 4, squeeze=False)
    nv = [v for d in norms.values() for v in d.values()]
    rv = [v for d in ranks.values() for v in d.values()]
    # one colour scale for the three when their sizes are comparable; else each its own, or the smaller
    # method's pattern would be one flat colour (AdaLoRA's updates can be far smaller than LoRA's)
    medians = [statistics.median(d.values()) for d in norms.values() if d]
    shared = bool(medians) and min(medians) > 0 and max(medians) / min(medians) <= 3
    for j, m in enumerate(METHODS):
        n = len(done.get(m) or [])
        _heatmap(fig, axes[0, j], norms.get(m, {}),
                 f"{LABEL[m]}: ‖dW‖_F ({n} seed(s))" + ("" if shared else "\n(own colour scale)"),
                 vmin=min(nv, default=0) if shared else None, vmax=max(nv, default=1) if shared else None)
        _heatmap(fig, axes[1, j], ranks.get(m, {}), f"{LABEL[m]}: effective rank", cmap="cividis",
                 vmin=0, vmax=max(rv, default=1))
    _heatmap(fig, axes[0, 3], _matrix_means(done.get("adalora") or [], "adalora_rank"),
             "AdaLoRA: final rank (kept singular values)", cmap="Oranges", annotate=".1f")
    ratio = {}
    if done.get("fwlora") and done.get("lora"):
        fw, lo = norms["fwlora"], norms["lora"]
        ratio = {k: math.log2(fw[k] / lo[k]) for k in fw if k in lo and fw[k] > 0 and lo[k] > 0}
    span = max((abs(v) for v in ratio.values()), default=1.0) or 1.0
    _heatmap(fig, axes[1, 3], ratio, "log2(‖dW‖ FW-LoRA / LoRA)\n(mean ‖dW‖ over seeds)", cmap="coolwarm",
             norm=TwoSlopeNorm(0.0, -span, span), annotate=".2f" if span >= 0.05 else None)  # else: read the colour bar
    fig.suptitle(f"{label}: {cell['task']} {cell['budget_label']}: final update per matrix", fontsize=10)
    return _save(fig, path)


def plot_curves(summary: dict[str, Any], task: str, path: Path) -> Path | None:
    from matplotlib.ticker import MaxNLocator

    cells = [c for c in summary["cells"] if c["task"] == task and c["curves"]]
    if not cells:
        return None
    fig = _figure(max(5.5, 3.6 * len(cells)), 3.4)
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    for ax, c in zip(axes, cells):
        for m, cur in c["curves"].items():
            mean = np.array([np.nan if v is None else v for v in cur["mean"]], float)
            std = np.array([0.0 if v is None else v for v in cur["std"]], float)
            ls, marker = STYLE.get(m, ("-", "o"))
            ax.plot(cur["epoch"], mean, marker=marker, ls=ls, label=f"{LABEL.get(m, m)} (n={max(cur['n'], default=0)})",
                    color=COLOUR.get(m))
            ax.fill_between(cur["epoch"], mean - std, mean + std, alpha=0.15, color=COLOUR.get(m))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(c["metric"] or "metric")
        ax.set_title(f"{task} {c['budget_label']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['label']}: {task}: metric per epoch (mean ± std over seeds)", fontsize=10)
    return _save(fig, path)


def write_plots(p: Protocol, summary: dict[str, Any], out_dir: Path, prefix: str) -> dict[str, list[str]]:
    """All plots of one protocol; returns {kind: [file names]} (relative to out_dir)."""
    plots: dict[str, list[str]] = defaultdict(list)

    def keep(kind: str, path: Path | None) -> None:
        if path is not None:
            plots[kind].append(path.name)

    keep("metric_vs_budget", plot_metric_vs_budget(summary, out_dir / f"{prefix}_metric_vs_budget.png"))
    keep("time_ratios", plot_time_ratios(summary, out_dir / f"{prefix}_time_ratios.png"))
    for task in summary["tasks"]:
        t = slug(task)
        cell = _middle_cell(summary["cells"], task, need="fwlora")
        if cell is not None:
            done = {m: [r.result for r in p.runs if r.result and r.task == task and r.budget_label == cell["budget_label"]
                        and r.method == m] for m in METHODS}
            keep("importance", plot_importance(cell, done["fwlora"], summary["label"],
                                               out_dir / f"{prefix}_{t}_{cell['budget_label']}_importance.png"))
            keep("matrices", plot_matrices(cell, done, summary["label"],
                                           out_dir / f"{prefix}_{t}_{cell['budget_label']}_matrices.png"))
        keep("curves", plot_curves(summary, task, out_dir / f"{prefix}_{t}_curves.png"))
    return dict(plots)


# ---- report.md -------------------------------------------------------------------------------------


def method_cell_text(stat: dict[str, Any] | None) -> str:
    """'0.512 ± 0.010', with the seed count when not every expected seed is done."""
    if stat is None:
        return "not run"
    text = fmt_mean_std(stat["final"]) if stat["complete"] else "—"
    if stat["complete"] < stat["expected"] or stat["complete"] == 0:
        text += f" ({stat['seeds_text']})"
    return text


def ratio_cell_text(stat: dict[str, Any] | None) -> str:
    if not stat or not (stat.get("time_ratio") or {}).get("n"):
        return "—"
    return f"{fmt_ratio(stat['time_ratio']['median'])} (step {fmt_ratio((stat.get('step_ratio') or {}).get('median'))})"


def main_table(summary: dict[str, Any]) -> str:
    """One row per task x budget: the three methods' final metric, time ratios, FW-LoRA - AdaLoRA."""
    rows = []
    for c in summary["cells"]:
        st = c["methods"]
        pct = f", {c['lora_percent']:.3f} %" if _ok(c.get("lora_percent")) else ""
        rows.append([f"{c['task']} ({c['metric'] or '?'})", f"{c['budget_label']}{pct}",
                     method_cell_text(st.get("lora")), method_cell_text(st.get("adalora")),
                     method_cell_text(st.get("fwlora")), ratio_cell_text(st.get("fwlora")),
                     ratio_cell_text(st.get("adalora")), fmt_ci(c["pairs"].get("fwlora-adalora", {}))])
    return markdown_table(["task (metric)", "budget (rank, LoRA %)", "LoRA", "AdaLoRA", "FW-LoRA",
                           "FW-LoRA time / LoRA", "AdaLoRA time / LoRA", "FW-LoRA − AdaLoRA [95 % CI]"], rows)


def detail_table(cell: dict[str, Any]) -> str:
    rows = []
    for m, s in cell["methods"].items():
        rows.append([LABEL.get(m, m), s["seeds_text"], fmt_mean_std(s["final"]), fmt_mean_std(s["best"]),
                     fmt(s["best_epoch"].get("mean"), 1),
                     f"{s['adapter_params']:,}" if s.get("adapter_params") else "—",
                     f"{s['head_params']:,}" if s.get("head_params") is not None else "—",
                     f"{s['actual_percent']:.3f} %" if _ok(s.get("actual_percent")) else "—",
                     fmt(s["train_seconds"].get("mean"), 1),
                     "1 (reference)" if m == "lora" else
                     (f"{fmt_ratio(s['time_ratio']['median'])} (n={s['time_ratio']['n']})" if s.get("time_ratio") else "—"),
                     "1 (reference)" if m == "lora" else
                     (f"{fmt_ratio(s['step_ratio']['median'])} (n={s['step_ratio']['n']})" if s.get("step_ratio") else "—"),
                     fmt(s["step_seconds_median"].get("mean"), 4)])
    return markdown_table(["method", "seeds", f"final {cell['metric'] or ''}", f"best {cell['metric'] or ''}",
                           "best epoch", "adapter params", "head params", "adapter % of backbone",
                           "train s (mean)", "time ratio", "step-time ratio", "median step s"], rows)


def _settings_md(s: dict[str, Any]) -> list[str]:
    lines = []
    if s["shared"]:
        lines.append("- Shared settings: " + ", ".join(f"{k} = {fmt_value(v)}" for k, v in s["shared"].items()))
    for k, per in s["per_method"].items():
        lines.append(f"- **{k} differs between methods**: " + ", ".join(f"{LABEL.get(m, m)} {fmt_value(v)}" for m, v in per.items()))
    for k, per in s["varying"].items():
        lines.append(f"- {k} varies within a method: " + "; ".join(
            f"{LABEL.get(m, m)} {', '.join(fmt_value(x) for x in v)}" for m, v in per.items()))
    if s["lora_alpha"]:
        lines.append("- Adapter alpha used: " + ", ".join(f"{LABEL.get(m, m)} {', '.join(fmt_value(x) for x in v)}"
                                                        for m, v in s["lora_alpha"].items()))
    if "fwlora" in s["own"]:
        lines.append("- FW-LoRA: " + ", ".join(f"{k} = {', '.join(fmt_value(x) for x in v)}" for k, v in s["own"]["fwlora"].items()))
    if "adalora" in s["own"]:
        lines.append("- AdaLoRA (PEFT; values over all budgets): " + ", ".join(f"{k} = {', '.join(fmt_value(x) for x in v)}"
                                                      for k, v in s["own"]["adalora"].items()))
    for d in s["data"]:
        lines.append(f"- Data: {d.get('source')}, {d.get('train_examples')} training / {d.get('eval_examples')} "
                     "evaluation examples")
    return lines


def _matrix_md(summary: dict[str, Any]) -> list[str]:
    rows, adarows, lines = [], [], []
    for c in summary["cells"]:
        q = c["matrices"]
        imp, w, fw, ada = q.get("importance"), q.get("weights"), q.get("fw_vs_lora", {}), q.get("adalora_vs_lora", {})
        er = q.get("effective_rank", {})
        if imp or fw.get("pairs"):
            rows.append([f"{c['task']} {c['budget_label']}", q["fw_runs"],
                         f"{fmt(imp['min'] * 100, 2)} / {fmt(imp['median'] * 100, 2)} / {fmt(imp['max'] * 100, 2)} "
                         f"(uniform {fmt(100 * (imp.get('uniform') or float('nan')), 2)})" if imp else "—",
                         fmt(imp.get("max_over_min"), 1) if imp else "—",
                         f"{fmt(w['min'], 4)} / {fmt(w['median'], 4)} / {fmt(w['max'], 4)}" if w else "—",
                         fmt(w.get("relative_range"), 4) if w else "—",
                         f"{fmt_signed(fw.get('mean_log_ratio'))} ± {fmt(fw.get('std_log_ratio'))} (n={fw.get('pairs', 0)})"
                         if fw.get("pairs") else "—",
                         fmt(fw.get("spearman"), 2) if fw.get("pairs") else "—",
                         fmt(fw.get("importance_spearman"), 2) if fw.get("pairs") else "—",
                         f"{fmt_signed(ada.get('mean_log_ratio'))} ± {fmt(ada.get('std_log_ratio'))}" if ada.get("pairs") else "—",
                         " / ".join(fmt((er.get(m) or {}).get("mean"), 2) for m in METHODS)])
        ar = q.get("adalora_rank")
        if ar:
            adarows.append([f"{c['task']} {c['budget_label']}", fmt(ar["total_mean"], 1),
                            f"{(c['rank'] or 0) * ar['matrices']}", f"{fmt(ar['min'], 0)} / {fmt(ar['median'], 1)} / {fmt(ar['max'], 0)}",
                            f"{100 * ar['zero_fraction']:.0f} %"])
    if rows:
        lines.append(markdown_table(
            ["task budget", "FW seeds", "I_m in %: min / median / max", "I max/min", "(1 − I_m): min / median / max",
             "(1 − I) relative range", "log(‖dW‖ FW / LoRA): mean ± spread", "Spearman ‖dW‖ FW vs LoRA",
             "Spearman(I_m, ‖dW‖ FW/LoRA)", "log(‖dW‖ AdaLoRA / LoRA)", "mean effective rank LoRA / AdaLoRA / FW"], rows))
        lines.append("")
        lines.append("Reading: the relative range of (1 − I_m) is (max − min) / mean, 0 for a uniform weight decay on dW. "
                     "The log ratio compares the final ‖dW_m‖ of FW-LoRA with LoRA's run of the same seed, matrix by "
                     "matrix: a mean below 0 is shrinkage; a spread near 0 with a Spearman near 1 means every matrix was "
                     "scaled alike (a uniform decay), not reallocated. Spearman(I_m, ratio) > 0 means the low-importance "
                     "matrices were shrunk more, as the method intends. AdaLoRA's shift against LoRA is given as the "
                     "scale of a method that does reallocate. Statistics are computed per seed and averaged.")
        for c in summary["cells"]:
            fw = c["matrices"].get("fw_vs_lora", {})
            g = fw.get("geometric_mean_ratio")
            if _ok(g):
                lines.append(f"- {c['task']} {c['budget_label']}: FW-LoRA's final ‖dW_m‖ is on average "
                             f"{abs(1 - g) * 100:.2g} % {'smaller' if g < 1 else 'larger'} than LoRA's (geometric mean "
                             f"over matrices and {fw['pairs']} seed(s)); the log ratio varies by "
                             f"{fmt(fw.get('std_log_ratio'), 3)} (std) across matrices")
            if fw.get("pairs", 0) > 1:
                per = ", ".join(f"seed {r['seed']}: {fmt(r.get('importance_spearman'), 2)}" for r in fw["by_seed"])
                lines.append(f"- {c['task']} {c['budget_label']}: Spearman(I_m, ratio) by seed: {per}")
    else:
        lines.append("No FW-LoRA run is complete in this protocol: the question cannot be answered from it.")
    if adarows:
        lines.append("")
        lines.append("AdaLoRA's final rank pattern (kept singular values per matrix, over its seeds):")
        lines.append("")
        lines.append(markdown_table(["task budget", "total rank (mean)", "LoRA's total (r × matrices)",
                                     "per matrix min / median / max", "matrices pruned to rank 0"], adarows))
    return lines


def protocol_markdown(summary: dict[str, Any], plots: dict[str, list[str]]) -> str:
    L = [f"## Protocol: {summary['label']}", ""]
    b = summary["bench"]
    if b.get("command"):
        L.append(f"- Command: `{b['command']}`" + (f" ({b['preset']})" if b.get("preset") else ""))
        if b.get("set"):
            L.append("- Overrides (--set): " + ", ".join(f"{k} = {fmt_value(v)}" for k, v in b["set"].items()))
    elif b.get("commands"):
        shown = b["commands"][:6]
        L.append("- Commands (from the runs' environment records):")
        L += [f"  - `{c}`" for c in shown]
        if len(b["commands"]) > len(shown):
            L.append(f"  - ... and {len(b['commands']) - len(shown)} more")
    L.append(f"- Directory: `{summary['root']}`. Runs: " +
             ", ".join(f"{n} {k}" for k, n in summary["counts"].items() if n))
    L.append("")
    for n in summary["notes"]:
        L += [f"> {n}", ""]
    L.append("### Settings")
    L += _settings_md(summary["settings"])
    if summary["settings"]["reduced"]:
        L.append("")
        L.append("**Reduced protocol**: these runs differ from METHOD.md's protocol (roberta-base, 3 epochs, full "
                 "training set, lr 2e-4, batch 32, warm-up ratio 0.06):")
        L += [f"- {x}" for x in summary["settings"]["reduced"]]
    env = summary["env"]
    L.append("")
    L.append("Environment: " + ("; ".join(f"{k}: " + " | ".join(f"{v} ({n} run{'s' if n != 1 else ''})" for v, n in d.items())
                                         for k, d in env.items() if d) or "no complete run records one"))
    L.append("")
    L.append("### Main table")
    L.append("")
    L.append("Final-epoch metric, mean ± sample std over seeds. Time ratio: median over seeds of (method / LoRA "
             "with the same seed, task and budget) in total training time; in brackets the same from the median "
             "step time, which is more robust to machine noise but leaves out FW-LoRA's slower warm-up steps.")
    L.append("")
    L.append(main_table(summary))
    for name in plots.get("metric_vs_budget", []) + plots.get("time_ratios", []):
        L += ["", f"![{name}]({name})"]
    L.append("")
    L.append("### Per task and budget")
    for c in summary["cells"]:
        L += ["", f"#### {c['task']}, {c['budget_label']}" +
              (f" (rank {c['rank']}, {c['lora_percent']:.3f} % for LoRA)" if c.get("rank") and _ok(c.get("lora_percent")) else ""),
              "", detail_table(c), ""]
        errors = [(m, s, e) for m, st in c["methods"].items() for s, e in st.get("errors", {}).items()]
        for m, s, e in errors:
            L.append(f"- {LABEL.get(m, m)} seed {s} failed: {e.splitlines()[0][:300] if e else 'no message'}")
        if errors:
            L.append("")
        L.append("Paired differences of the final metric over seeds (95 % Student t interval) and verdicts:")
        L.append("")
        L += [f"- {v}" for v in c["verdicts"]] or ["- no comparison possible"]
    L += ["", "### Pooled over budgets (pairs = budget × seed)", ""]
    for task, entry in summary["pooled"].items():
        L.append(f"- **{task}** ({', '.join(entry['budgets'])}):")
        L += [f"  - {x}" for x in pooled_lines(task, entry)] or ["  - no pairs"]
    L += ["", "### Open question 1: reallocation or uniform decay?", ""]
    L += _matrix_md(summary)
    for kind, title in (("importance", "FW-LoRA importance per matrix"), ("matrices", "Final update per matrix"),
                        ("curves", "Learning curves")):
        for name in plots.get(kind, []):
            L += ["", f"{title}: ![{name}]({name})"]
    missing = [k for k in ("metric_vs_budget", "time_ratios", "importance", "matrices", "curves") if not plots.get(k)]
    if missing:
        L += ["", f"Plots not drawn for lack of data: {', '.join(missing)}."]
    return "\n".join(L) + "\n"


# ---- the entry points ------------------------------------------------------------------------------


def write_report(run_dirs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Scan run_dirs, write report.md, summary.json, summary.csv and the PNGs into out_dir.

    Returns {"main_table": markdown, "report": path, "summary": path, "csv": path, "plots": [paths],
    "protocols": [per-protocol summaries]}. Raises UserError for a path that does not exist or when no
    complete run is found.
    """
    run_dirs = [Path(d) for d in run_dirs]
    out_dir = Path(out_dir)
    protocols = discover(run_dirs)
    complete = sum(r.status == "complete" for p in protocols for r in p.runs)
    if not complete:
        counts: dict[str, int] = defaultdict(int)
        for p in protocols:
            for r in p.runs:
                counts[r.status] += 1
        found = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no run directory at all"
        raise UserError(f"no complete run (result.json with status complete) under {', '.join(map(str, run_dirs))}: "
                        f"found {found}")
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries, all_plots, tables = [], [], []
    parts = ["# LoRA vs AdaLoRA vs FW-LoRA: report", "",
             "Generated by `fwlora report` from " + ", ".join(f"`{d}`" for d in run_dirs) +
             ". Every number below is computed from the runs' result.json files.", ""]
    if len(protocols) > 1:
        parts.append("Protocols (each compared within itself only): " + "; ".join(p.label for p in protocols))
        parts.append("")
    for i, p in enumerate(protocols, start=1):
        if not p.runs and not p.expected:
            continue
        s = summarise_protocol(p)
        prefix = f"p{i}_{slug(p.label)}"[:80]
        plots = write_plots(p, s, out_dir, prefix)
        s["plots"] = plots
        summaries.append(s)
        all_plots += [str(out_dir / n) for names in plots.values() for n in names]
        tables.append(f"**{p.label}**\n\n{main_table(s)}")
        parts.append(protocol_markdown(s, plots))
        log.info("protocol %s: %d runs, %d cells, %d plots", p.label, len(p.runs), len(s["cells"]),
                 sum(len(v) for v in plots.values()))
    table = "\n\n".join(tables)
    report_path = write_text_atomic(out_dir / "report.md", "\n".join(parts))
    summary_path = write_json(out_dir / "summary.json", {"run_dirs": [str(d) for d in run_dirs], "protocols": summaries})
    csv_path = write_text_atomic(out_dir / "summary.csv", summary_csv(summaries))
    return {"main_table": table, "report": str(report_path), "summary": str(summary_path), "csv": str(csv_path),
            "plots": all_plots, "protocols": summaries}


CSV_COLUMNS = ("protocol", "task", "budget_label", "rank", "lora_percent", "method", "metric", "seeds_expected",
               "seeds_complete", "failed", "running", "missing", "final_mean", "final_std", "best_mean", "best_std",
               "adapter_params", "head_params", "actual_percent", "train_seconds_mean", "step_seconds_median_mean",
               "time_ratio_median", "step_ratio_median", "ratio_pairs", "diff_vs_lora_mean", "diff_vs_lora_low",
               "diff_vs_lora_high")


def summary_csv(summaries: Sequence[dict[str, Any]]) -> str:
    """One row per protocol x task x budget x method."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in summaries:
        for c in s["cells"]:
            for m, st in c["methods"].items():
                ci = c["pairs"].get(f"{m}-lora") or {}
                tr, sr = st.get("time_ratio") or {}, st.get("step_ratio") or {}
                w.writerow([s["label"], c["task"], c["budget_label"], c["rank"], c["lora_percent"], m, c["metric"],
                            st["expected"], st["complete"], st.get("failed", 0), st.get("running", 0) + st.get("interrupted", 0),
                            st.get("missing", 0), st["final"]["mean"], st["final"]["std"], st["best"]["mean"],
                            st["best"]["std"], st.get("adapter_params"), st.get("head_params"), st.get("actual_percent"),
                            st["train_seconds"]["mean"], st["step_seconds_median"]["mean"],
                            1.0 if m == "lora" else tr.get("median"), 1.0 if m == "lora" else sr.get("median"),
                            tr.get("n"), ci.get("mean"), ci.get("low"), ci.get("high")])
    return buf.getvalue()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="tables, paired statistics, verdicts and plots from finished runs",
        description="Read the result.json of every run under the given directories and write report.md "
                    "(tables, paired differences with 95 % intervals, verdicts on METHOD.md's hypotheses, the "
                    "per-matrix numbers of its first open question), summary.json, summary.csv and PNG plots. "
                    "Unfinished runs (config.json only) and failed runs are counted and marked, never read as "
                    "results. A bench directory (with bench.json) is one protocol; several can be compared side "
                    "by side. Loose runs under a RUN_DIR form one protocol, split by setting where it holds "
                    "several runs of one task, budget, method and seed (pilot runs at several learning rates). "
                    "Prints the main table.",
        epilog="examples:\n  fwlora report runs/quick\n"
               "  fwlora report runs/shared_lr runs/tuned --output runs/report\n"
               "  fwlora report runs/explore /tmp/one_run --output /tmp/report",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a bench directory, a run directory, or any directory above runs (searched recursively)")
    p.add_argument("--output", type=Path, metavar="DIR", help="where the report goes (default: <first RUN_DIR>/report)")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    out = args.output or Path(args.run_dirs[0]) / "report"
    summary = write_report(list(args.run_dirs), out)
    print(summary["main_table"])
    print(f"\nreport: {summary['report']}")
    return 0
