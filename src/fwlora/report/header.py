"""The head of a protocol's part of report.md: the command that ran it, what its runs were made with, how
they differ from the reference protocol, the environment, and how a frozen preset chose each column's lr."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fwlora.report.columns import Columns
from fwlora.report.load import LrChoice
from fwlora.report.settings import REFERENCE_PROTOCOL, Environment, ProtocolSettings, Provenance
from fwlora.report.summary import ProtocolReport
from fwlora.report.text import fmt, fmt_value, markdown_table


def _settings(values: Mapping[str, Any]) -> str:
    """'lr = 0.001, epochs = 3'"""
    return ", ".join(f"{k} = {fmt_value(v)}" for k, v in values.items())


def _values(items: list) -> str:
    return ", ".join(fmt_value(x) for x in items)


def provenance_lines(b: Provenance) -> list[str]:
    if b.command:
        lines = [f"- Command: `{b.command}`" + (f" ({b.preset})" if b.preset else "")]
        lines += [f"- **{b.note}**"] if b.note else []
        return lines + (["- Overrides (--set): " + _settings(b.overrides)] if b.overrides else [])
    if not b.commands:
        return []
    shown = b.commands[:6]
    lines = ["- Commands (from the runs' environment records):", *[f"  - `{c}`" for c in shown]]
    more = len(b.commands) - len(shown)
    return lines + ([f"  - ... and {more} more"] if more else [])


def environment_text(env: Environment) -> str:
    """'packages: torch 2.x (3 runs) | torch 2.y (1 run); git: ...', or why there is none."""
    kinds = {f.name: getattr(env, f.name) for f in dataclasses.fields(env)}
    def counted(seen: Mapping[str, int]) -> str:
        return " | ".join(f"{v} ({n} run{'s' if n != 1 else ''})" for v, n in seen.items())

    return "; ".join(f"{kind}: {counted(seen)}" for kind, seen in kinds.items() if seen) \
        or "no complete run records one"


def header_lines(r: ProtocolReport) -> list[str]:
    lines = [f"## Protocol: {r.label}", "", *provenance_lines(r.provenance)]
    counts = ", ".join(f"{n} {status}" for status, n in r.counts.items() if n)
    lines += [f"- Directory: `{r.root}`. Runs: {counts}", ""]
    for note in r.notes:
        lines += [f"> {note}", ""]
    lines += ["### Settings", *settings_lines(r.settings, r.columns)]
    if r.settings.reduced:
        lines += ["", f"**Reduced protocol**: these runs differ from {REFERENCE_PROTOCOL.name}'s protocol "
                      f"({REFERENCE_PROTOCOL.description}):", *[f"- {x}" for x in r.settings.reduced]]
    lines += ["", "Environment: " + environment_text(r.env)]
    return lines + learning_rate_lines(r.lr_choice, r.columns)


def settings_lines(s: ProtocolSettings, cols: Columns) -> list[str]:
    name = cols.name
    lines = ["- Shared settings: " + _settings(s.shared)] if s.shared else []
    for k, per in s.per_column.items():
        lines.append(f"- **{k} differs between methods**: " + ", ".join(f"{name(m)} {fmt_value(v)}"
                                                                       for m, v in per.items()))
    for k, per in s.varying.items():
        lines.append(f"- {k} varies within a method: "
                     + "; ".join(f"{name(m)} {_values(v)}" for m, v in per.items()))
    if s.adapter_alpha:
        lines.append("- Adapter alpha used: "
                     + ", ".join(f"{name(m)} {_values(v)}" for m, v in s.adapter_alpha.items()))

    def resolved(label: str) -> str | None:  # a method whose resolved values are shown (a schedule): last
        cls = cols.method_class(label)
        return cls.report_info_note if cls and cls.report_info else None

    for m, table in sorted(s.own.items(), key=lambda kv: resolved(kv[0]) is not None):
        head = f"{name(m)} ({resolved(m)})" if resolved(m) else name(m)
        lines.append(f"- {head}: " + ", ".join(f"{k} = {_values(v)}" for k, v in table.items()))
    return lines + [f"- Data: {d.source}, {d.train_examples} training / {d.eval_examples} evaluation examples"
                    for d in s.data]


def _is_lr(label: str, lr: float) -> bool:
    """Whether an lr label of the lr_choice block ('5e-4') names this learning rate."""
    try:
        return math.isclose(float(label), lr, rel_tol=1e-6)
    except ValueError:
        return False


def _lr_value(label: str) -> float:
    try:
        return float(label)
    except ValueError:
        return math.inf


def learning_rate_lines(choice: LrChoice | None, cols: Columns) -> list[str]:
    """Each column's chosen lr and what every lr scored on the design seed (the chosen one in bold), with
    each lr's shortfall from its task's best summed over tasks: the numbers the choice was made from."""
    if choice is None:
        return []
    grids = [*(by_lr for tasks in choice.scores.values() for by_lr in tasks.values()),
             *choice.shortfall.values()]
    lr_labels = sorted({label for grid in grids for label in grid}, key=_lr_value)  # ascending, extensions included
    rows = []
    for column, chosen in choice.chosen.items():
        chosen_label = next((label for label in lr_labels if _is_lr(label, chosen)), f"{chosen:g}")

        def row(what: str, by_lr: Mapping[str, float | None], failed: str) -> list[str]:
            cells = []
            for label in lr_labels:
                text = failed if label in by_lr and by_lr[label] is None else fmt(by_lr.get(label), 4)
                cells.append(f"**{text}**" if label == chosen_label else text)
            return [cols.name(column), chosen_label, what, *cells]

        rows += [row(task, by_lr, "failed") for task, by_lr in (choice.scores.get(column) or {}).items()]
        if column in choice.shortfall:
            rows.append(row("shortfall, summed over tasks", choice.shortfall[column], "—"))
    return ["", "### Learning rates", "",
            f"Each column's learning rate was chosen on the design seed {choice.seed} before any evaluation "
            f"seed ran ({choice.rule}). The final metric of every lr on that seed, the chosen one in bold:",
            "",
            markdown_table(["column", "chosen lr", "task", *[f"lr {label}" for label in lr_labels]], rows),
            *([""] + [f"{cols.name(c)}'s lr is the grid's {end}: one beyond it was not tried, and may do better."
                      for c, end in choice.at_edge.items()] if choice.at_edge else [])]
