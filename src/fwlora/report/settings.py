"""What a protocol's runs were made with: shared settings, those that differ between columns, each
method's own, the differences from the protocol (docs/method.md), the environment and the bench command."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from fwlora import methods
from fwlora.report.load import IGNORED_KEYS, Protocol, relevant
from fwlora.report.text import fmt_value

# The protocol of docs/method.md (the seed's, METHOD.md); a run that differs from it is reported under "Reduced protocol".
REFERENCE_PROTOCOL: dict[str, Any] = {"epochs": 3, "train_limit": None, "eval_limit": None, "model": "roberta-base",
                                      "lr": 2e-4, "batch_size": 32, "warmup_ratio": 0.06}
# The settings shown in a protocol's header (others appear when they differ between runs).
HEADER_KEYS = ("model", "head", "epochs", "lr", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
               "max_grad_norm", "max_length", "train_limit", "eval_limit", "lora_alpha", "lora_dropout",
               "mixed_precision", "target_modules")


def _hashable(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def _values(items: Sequence[Any]) -> list[Any]:
    return [json.loads(x) for x in sorted({_hashable(v) for v in items})]


def reduced_protocol(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Settings that differ from the protocol (docs/method.md), with the values found (and how many runs)."""
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


def protocol_settings(p: Protocol, labels: Sequence[str], method_of: dict[str, str]) -> dict[str, Any]:
    """The settings shared by every run, those that differ between columns, each column's own (its
    method's settings, or what its method resolved: report_info), and the differences from the protocol (docs/method.md)."""
    configs: dict[str, list[dict]] = {lb: [r.config for r in p.runs if r.label == lb] for lb in labels}
    configs = {lb: cs for lb, cs in configs.items() if cs}
    all_configs = [c for cs in configs.values() for c in cs]
    keys = sorted({k for c in all_configs for k in c} - IGNORED_KEYS)
    shared, per_method, varying = {}, {}, {}
    for k in keys:
        values = {lb: sorted({_hashable(c.get(k)) for c in cs}) for lb, cs in configs.items()
                  if relevant(method_of.get(lb, lb), k)}
        flat = {v for vs in values.values() for v in vs}
        if not flat:
            continue
        if len(flat) == 1:
            value = json.loads(next(iter(flat)))
            if k in HEADER_KEYS and (value is not None or k in REFERENCE_PROTOCOL):
                shared[k] = value
        elif all(len(v) == 1 for v in values.values()):
            per_method[k] = {lb: json.loads(v[0]) for lb, v in values.items()}
        else:
            varying[k] = {lb: [json.loads(x) for x in v] for lb, v in values.items()}
    own: dict[str, dict[str, list]] = {}
    for lb, cs in configs.items():
        method = method_of.get(lb, lb)
        info = [r.record.method_info for r in p.runs if r.label == lb and r.result and r.record.method_info]
        shown = getattr(methods.method_class(method), "report_info", ())  # what it resolved (AdaLoRA's schedule)
        if shown and info:
            own[lb] = {k: _values([i.get(k) for i in info]) for k in shown if any(k in i for i in info)}
            continue
        mine = [k for k in dict.fromkeys(k for c in cs for k in c) if methods.owner_of(k) == method]
        table = {k: _values([c.get(k) for c in cs if k in c]) for k in mine}
        table = {k: v for k, v in table.items() if any(x not in (None, False) for x in v)}  # flags off, unset: say nothing
        if table:
            own[lb] = table
    lora_alpha = {lb: sorted({(r.record.budget or {}).get("lora_alpha") for r in p.runs if r.label == lb and r.result},
                             key=str) for lb in configs}
    data = sorted({json.dumps({k: (r.record.data or {}).get(k) for k in ("source", "train_examples", "eval_examples")},
                              sort_keys=True) for r in p.runs if r.result})
    return {"shared": shared, "per_method": per_method, "varying": varying, "own": own,
            "lora_alpha": {lb: v for lb, v in lora_alpha.items() if v}, "data": [json.loads(d) for d in data],
            "reduced": reduced_protocol(all_configs)}


def protocol_env(p: Protocol) -> dict[str, Any]:
    """Distinct package versions, git commits and machines the runs report (with how many runs each)."""
    out: dict[str, dict[str, int]] = {"packages": defaultdict(int), "git": defaultdict(int), "machine": defaultdict(int)}
    for r in p.runs:
        env = r.result.env if r.result else None
        if not env:
            continue
        pk = env.get("packages") or {}
        out["packages"][", ".join(f"{k} {v}" for k, v in pk.items() if v)] += 1
        commit = env.get("git_commit")
        out["git"][(commit or "unknown (not a git checkout)") + (" (dirty)" if env.get("git_dirty") else "")] += 1
        out["machine"][f"{env.get('cuda_device') or 'CPU'}, python {env.get('python')}, "
                       f"{env.get('torch_threads')} torch threads, {env.get('platform')}"] += 1
    return {k: dict(v) for k, v in out.items()}


def bench_header(p: Protocol) -> dict[str, Any]:
    """The bench command and its overrides; for loose runs, the commands their records name."""
    if p.bench:
        preset = p.bench.get("preset") if isinstance(p.bench.get("preset"), dict) else {}
        return {"command": p.bench.get("command"), "set": p.bench.get("set") or {},
                "preset": preset.get("source"), "note": preset.get("note")}
    commands = sorted({(r.result.env or {}).get("command") for r in p.runs if r.result} - {None})
    return {"commands": commands}
