"""What a protocol's runs were made with: shared settings, those that differ between columns, each method's
own, the differences from the reference protocol, the environment, and the command that ran them."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fwlora import methods
from fwlora.report.columns import Columns
from fwlora.report.load import IGNORED_KEYS, Protocol, relevant, value_key
from fwlora.report.text import fmt_value


@dataclass(frozen=True)
class ReferenceProtocol:
    """The protocol a run is measured against under "Reduced protocol"."""

    name: str  # how a report cites it
    description: str
    settings: Mapping[str, Any]


# The seed's protocol (docs/method.md, "The protocol"): what a reduced protocol is measured against.
REFERENCE_PROTOCOL = ReferenceProtocol(
    "the seed", "roberta-base, 3 epochs, full training set, lr 2e-4, batch 32, warm-up ratio 0.06",
    {"epochs": 3, "train_limit": None, "eval_limit": None, "model": "roberta-base", "lr": 2e-4,
     "batch_size": 32, "warmup_ratio": 0.06})
# The settings shown in a protocol's header (others appear when they differ between runs).
HEADER_KEYS = ("model", "head", "epochs", "lr", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
               "max_grad_norm", "max_length", "train_limit", "eval_limit", "lora_alpha", "lora_dropout",
               "mixed_precision", "target_modules")


@dataclass(frozen=True)
class DataSource:
    source: str | None
    train_examples: int | None
    eval_examples: int | None


@dataclass(frozen=True)
class ProtocolSettings:
    shared: Mapping[str, Any]  # setting -> the one value every run has (HEADER_KEYS only)
    # setting -> column -> value, where each column is constant but columns differ
    per_column: Mapping[str, Mapping[str, Any]] = field(metadata={"json": "per_method"})
    varying: Mapping[str, Mapping[str, list]]  # setting -> column -> its values, where a column has several
    own: Mapping[str, Mapping[str, list]]  # column -> its method's settings (or what it resolved) -> values
    adapter_alpha: Mapping[str, list]  # column -> the adapter alphas its runs used
    data: tuple[DataSource, ...]
    reduced: tuple[str, ...]  # how the runs differ from the reference protocol


@dataclass(frozen=True)
class Environment:
    """Each distinct value the runs report, with how many runs report it."""

    packages: Mapping[str, int]
    git: Mapping[str, int]
    machine: Mapping[str, int]


@dataclass(frozen=True)
class Provenance:
    """The bench command and its overrides; for loose runs, the commands their records name."""

    command: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict, metadata={"json": "set"})
    preset: str | None = None
    note: str | None = None
    commands: tuple[str, ...] = ()


def _values(items: Sequence[Any]) -> list[Any]:
    return [json.loads(x) for x in sorted({value_key(v) for v in items})]


def reduced_protocol(configs: Sequence[Mapping[str, Any]],
                     reference: ReferenceProtocol = REFERENCE_PROTOCOL) -> list[str]:
    """Settings that differ from the reference protocol, with the values found (and how many runs)."""
    out = []
    for key, ref in reference.settings.items():
        values: dict[str, int] = defaultdict(int)
        for c in configs:
            v = c.get(key)
            if v is None or ref is None:
                same = v is None and ref is None
            else:
                same = math.isclose(float(v), ref) if isinstance(ref, float) else v == ref
            if not same:
                values[fmt_value(v)] += 1
        if values:
            found = ", ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in sorted(values.items()))
            wanted = fmt_value(ref) if ref is not None else "not set"
            out.append(f"{key} = {found} ({reference.name}: {wanted})")
    return out


def protocol_settings(p: Protocol, cols: Columns) -> ProtocolSettings:
    """The settings shared by every run, those that differ between columns, each column's own (its method's
    settings, or what its method resolved: report_info), and the differences from the reference protocol."""
    configs = {lb: cs for lb in cols.labels if (cs := [r.config for r in p.runs if r.label == lb])}
    all_configs = [c for cs in configs.values() for c in cs]
    keys = sorted({k for c in all_configs for k in c} - IGNORED_KEYS)
    shared, per_column, varying = {}, {}, {}
    for k in keys:
        values = {lb: sorted({value_key(c.get(k)) for c in cs}) for lb, cs in configs.items()
                  if relevant(cols.method(lb), k)}
        flat = {v for vs in values.values() for v in vs}
        if not flat:
            continue
        if len(flat) == 1:
            value = json.loads(next(iter(flat)))
            if k in HEADER_KEYS and (value is not None or k in REFERENCE_PROTOCOL.settings):
                shared[k] = value
        elif all(len(v) == 1 for v in values.values()):
            per_column[k] = {lb: json.loads(v[0]) for lb, v in values.items()}
        else:
            varying[k] = {lb: [json.loads(x) for x in v] for lb, v in values.items()}
    own = {lb: table for lb, cs in configs.items() if (table := _own_settings(p, cols, lb, cs)) is not None}
    done = [r for r in p.runs if r.result]
    adapter_alpha = {lb: sorted({r.record.budget.lora_alpha for r in done if r.label == lb},
                                key=str) for lb in configs}
    sources = [{k: (r.record.data or {}).get(k) for k in ("source", "train_examples", "eval_examples")}
               for r in done]
    data = sorted({json.dumps(source, sort_keys=True) for source in sources})
    return ProtocolSettings(shared, per_column, varying, own, {lb: v for lb, v in adapter_alpha.items() if v},
                            tuple(DataSource(**json.loads(d)) for d in data),
                            tuple(reduced_protocol(all_configs)))


def _own_settings(p: Protocol, cols: Columns, label: str,
                  configs: list[Mapping[str, Any]]) -> dict[str, list] | None:
    """A column's method's settings; for a method whose resolved values say more (report_info: a schedule
    computed from the run's length), those values from its records. None: nothing to show."""
    method, cls = cols.method(label), cols.method_class(label)
    info = [r.record.method_info for r in p.runs if r.label == label and r.result and r.record.method_info]
    shown = cls.report_info if cls else ()
    if shown and info:
        return {k: _values([i.get(k) for i in info]) for k in shown if any(k in i for i in info)}
    mine = [k for k in dict.fromkeys(k for c in configs for k in c) if methods.owner_of(k) == method]
    table = {k: _values([c.get(k) for c in configs if k in c]) for k in mine}
    # a flag that is off, a setting left unset: nothing to say
    table = {k: v for k, v in table.items() if any(x not in (None, False) for x in v)}
    return table or None


def protocol_env(p: Protocol) -> Environment:
    """Distinct package versions, git commits and machines the runs report (with how many runs each)."""
    packages: dict[str, int] = defaultdict(int)
    git: dict[str, int] = defaultdict(int)
    machine: dict[str, int] = defaultdict(int)
    for r in p.runs:
        env = r.result.env if r.result else None
        if not env:
            continue
        packages[", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)] += 1
        commit = env.get("git_commit")
        git[(commit or "unknown (not a git checkout)") + (" (dirty)" if env.get("git_dirty") else "")] += 1
        machine[f"{env.get('cuda_device') or 'CPU'}, python {env.get('python')}, "
                f"{env.get('torch_threads')} torch threads, {env.get('platform')}"] += 1
    return Environment(dict(packages), dict(git), dict(machine))


def provenance(p: Protocol) -> Provenance:
    if p.bench:
        return Provenance(p.bench.command, p.bench.overrides, p.bench.preset_source, p.bench.preset_note)
    commands = sorted({(r.result.env or {}).get("command") for r in p.runs if r.result} - {None})
    return Provenance(commands=tuple(commands))
