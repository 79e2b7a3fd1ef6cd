"""The sweep's outputs, written from the shared studies by each worker when it finishes: best_params.json,
importance.json, plots/<study>-history.png and -parallel.png, best_<method>.yaml (full settings for
`fwlora train --config`), tuned_preset.yaml (a `fwlora bench` preset), sweep_summary.md and sweep.json."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from fwlora.config import TrainConfig
from fwlora.files import write_atomic, write_json, write_text_atomic
from fwlora.sweep.config import PER_CELL, SweepConfig, counts_toward_total
from fwlora.sweep.space import format_params
from fwlora.tasks import task_for

PROGRAM = __name__.split(".")[0]

if TYPE_CHECKING:
    import optuna


def study_counts(study: "optuna.Study") -> dict[str, int]:
    """Trials by outcome; surplus trials (closed unused after a lost race) are not shown as failed."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    by = {s: [t for t in trials if t.state == s] for s in TrialState}
    failed = [t for t in by[TrialState.FAIL] if not t.user_attrs.get("surplus")]
    return {"complete": len(by[TrialState.COMPLETE]), "pruned": len(by[TrialState.PRUNED]),
            "infeasible": sum(1 for t in by[TrialState.PRUNED] if "infeasible" in t.user_attrs),
            "failed": len(failed), "diverged": sum(1 for t in failed if t.user_attrs.get("counts")),
            "running": len(by[TrialState.RUNNING]), "counted": sum(counts_toward_total(t) for t in trials)}


def best_config(cfg: SweepConfig, method: str, trial: "optuna.trial.FrozenTrial") -> dict[str, Any]:
    """Full TrainConfig settings of a trial, as `fwlora train --config` takes them."""
    values = {**cfg.trial_settings(method, trial.params), "seed": cfg.seeds[0],
              "output_dir": f"runs/{cfg.study_name(method)}-best"}
    return TrainConfig.from_dict(values, source=f"best trial {trial.number} of {cfg.study_name(method)}").to_dict()


def param_importances(study: "optuna.Study") -> dict[str, Any]:
    """Optuna's importances, or a note saying why there are none; its caveats (few trials) kept."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {"note": f"needs at least 2 complete trials, the study has {len(complete)}"}
    if not any(t.params for t in complete):
        return {"note": "no searched parameters"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too little variation, say
            return {"note": f"could not be computed: {e}"}
    out: dict[str, Any] = {"importances": {k: float(v) for k, v in values.items()}}
    notes = sorted({str(w.message) for w in caught if not isinstance(w.message, optuna.exceptions.ExperimentalWarning)})
    if notes:
        out["note"] = " ".join(notes)
    return out


def write_plots(study: "optuna.Study", directory: Path) -> dict[str, str]:
    """History and parallel-coordinate PNGs where the study has enough complete trials; notes otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out: dict[str, str] = {}
    plots = [("history", ovm.plot_optimization_history, 1), ("parallel", ovm.plot_parallel_coordinate, 2)]
    directory.mkdir(parents=True, exist_ok=True)
    for kind, plot, needed in plots:
        if len(complete) < needed or (kind == "parallel" and not any(t.params for t in complete)):
            out[kind] = f"skipped: needs {needed} complete trial(s) with parameters, the study has {len(complete)}"
            continue
        path = directory / f"{study.study_name}-{kind}.png"
        with warnings.catch_warnings():  # experimental-API notices, axis limits of a one-valued parameter
            warnings.simplefilter("ignore")
            ax = plot(study)
        ax.set_title(f"{study.study_name}: {ax.get_title()}")
        fig = ax.figure
        fig.set_size_inches(9, 5)
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        out[kind] = str(path)
    return out


def export(cfg: SweepConfig, studies: Mapping[str, "optuna.Study"], storage: str) -> dict[str, Any]:
    """Write best_params.json, importance.json, plots, best_<method>.yaml, tuned_preset.yaml,
    sweep_summary.md and sweep.json into the output directory; return what was written."""
    out_dir = Path(cfg.output_dir)
    metric = task_for(cfg.base_config()).metric
    best: dict[str, Any] = {}
    importance: dict[str, Any] = {}
    plots: dict[str, Any] = {}
    configs: dict[str, dict[str, Any]] = {}
    for method, study in studies.items():
        counts = study_counts(study)
        try:
            trial = study.best_trial
        except ValueError:  # no complete trial yet
            trial = None
        entry: dict[str, Any] = {"study": study.study_name, "metric": metric, "objective": cfg.objective,
                                 "seeds": cfg.seeds, "trials": counts}
        if trial is not None:
            entry.update(value=trial.value, trial=trial.number, params=trial.params,
                         runs=trial.user_attrs.get("runs"))
            configs[method] = best_config(cfg, method, trial)
            path = out_dir / f"best_{method}.yaml"
            header = (f"# best of study {study.study_name}: trial {trial.number}, {cfg.objective} {metric} "
                      f"{trial.value:.4f} (mean of {len(cfg.seeds)} seed(s)), written by fwlora sweep\n"
                      f"# fwlora train --config {path.name} --seed 1 --output-dir runs/{method}-seed1\n")
            write_text_atomic(path, header + yaml.safe_dump(configs[method], sort_keys=False))
            entry["config_file"] = str(path)
        best[method] = entry
        importance[method] = {"study": study.study_name, **param_importances(study)}
        plots[method] = write_plots(study, out_dir / "plots")
    write_json(out_dir / "best_params.json", best)
    write_json(out_dir / "importance.json", importance)
    preset_path = write_tuned_preset(cfg, configs, out_dir / "tuned_preset.yaml")
    summary = summary_markdown(cfg, best, storage)
    write_text_atomic(out_dir / "sweep_summary.md", summary)
    write_json(out_dir / "sweep.json", {
        "command": " ".join([PROGRAM] + sys.argv[1:]), "storage": storage, "task": cfg.task, "methods": cfg.methods,
        "studies": {m: cfg.study_name(m) for m in cfg.methods}, "trials": cfg.trials, "objective": cfg.objective,
        "seeds": cfg.seeds, "sampler_seed": cfg.sampler_seed,
        "pruner": {"kind": cfg.pruner, "startup_trials": cfg.prune_startup_trials, "from_epoch": cfg.prune_from_epoch},
        "settings": cfg.settings, "space": {n: p.to_dict() for n, p in cfg.space.items()}, "plots": plots})
    return {"best": best, "importance": importance, "plots": plots, "summary": summary,
            "preset": str(preset_path) if preset_path else None}


def write_tuned_preset(cfg: SweepConfig, configs: Mapping[str, dict[str, Any]], path: Path) -> Path | None:
    """A `fwlora bench` preset: shared settings in train:, each method's tuned ones in methods:.

    bench sets every cell's rank (or budget) from the grid, so that methods are compared at one budget:
    the tuned ranks become the grid's ranks, not per-method settings."""
    if not configs:
        return None
    tuned = {m: {k: v for k, v in c.items() if k in cfg.space_for(m) and k not in PER_CELL} for m, c in configs.items()}
    shared = {k: v for k, v in cfg.settings.items() if k not in PER_CELL}
    grid: dict[str, Any] = {"tasks": [cfg.task], "methods": list(configs), "seeds": 3}
    ranks = sorted({c["rank"] for c in configs.values() if c.get("rank") is not None})
    budgets = sorted({c["budget"] for c in configs.values() if c.get("budget") is not None})
    if ranks:
        grid["ranks"] = ranks
    else:
        grid["budgets"] = budgets or [0.2]  # train's default budget
    chosen = ", ".join(f"{m} rank {c.get('rank')}" if c.get("rank") else f"{m} budget {c.get('budget')}"
                       for m, c in configs.items())
    header = ("# Tuned by fwlora sweep (" + ", ".join(cfg.study_name(m) for m in configs) + f"), objective "
              f"{cfg.objective}.\n# fwlora bench --preset {path.name} --output-dir runs/tuned\n"
              f"# bench sets the rank of every run from the grid (one budget for all methods); the sweep chose: "
              f"{chosen}.\n# Edit grid: (seeds, ranks or budgets) to taste.\n")
    body = yaml.safe_dump({"grid": grid, "train": shared, "methods": tuned}, sort_keys=False)
    write_text_atomic(path, header + body)
    return path


def summary_markdown(cfg: SweepConfig, best: Mapping[str, Any], storage: str) -> str:
    """Best of N per method, side by side, with every trial outcome counted."""
    metric = task_for(cfg.base_config()).metric
    n = len(cfg.seeds)
    lines = [f"# Sweep: {cfg.task}, best of N per method (--trials {cfg.trials})",
             "",
             f"Objective: {cfg.objective}-epoch validation {metric}, mean over {n} seed(s) ({', '.join(map(str, cfg.seeds))}).",
             "",
             f"| method | best {metric} | trial | complete | pruned | failed | running | parameters |",
             "|---|---|---|---|---|---|---|---|"]
    for method in cfg.methods:
        e = best.get(method)
        if e is None:
            continue
        c = e["trials"]
        pruned = f"{c['pruned']}" + (f" ({c['infeasible']} infeasible)" if c["infeasible"] else "")
        failed = f"{c['failed']}" + (f" ({c['diverged']} diverged)" if c["diverged"] else "")
        value = f"{e['value']:.4f}" if "value" in e else "-"
        lines.append(f"| {method} | {value} | {e.get('trial', '-')} | {c['complete']} | {pruned} | {failed} | "
                     f"{c['running']} | {format_params(e.get('params') or {}) if 'params' in e else '-'} |")
    lines += ["", "Pruned: stopped by the pruner, or infeasible (never trained); failed: diverged (counted) or "
              "interrupted, crashed or left by a dead worker (replaced by another trial). Every method got the same number of trials.",
              "", f"Studies in {storage}: " + ", ".join(cfg.study_name(m) for m in cfg.methods) + "."]
    return "\n".join(lines) + "\n"
