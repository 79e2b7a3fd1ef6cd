"""A protocol's columns: the labels (a method, or a bench's named variant of one) in registry order, the method
behind each, the printed names, the reference and the rival, and what the registry says of each column."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fwlora import methods
from fwlora.report.load import Protocol


@dataclass
class Columns:
    """A protocol's columns: labels in order, the method behind each, the printed names, the reference."""

    labels: list[str]
    method_of: dict[str, str]
    names: dict[str, str]
    reference: str

    @property
    def rival(self) -> str | None:
        """The rival's column (AdaLoRA's, the registry says) that every other column is compared with (not
        when it is the reference)."""
        rival = methods.rival_name()
        return rival if rival in self.labels and self.reference != rival else None

    def pairs(self) -> list[tuple[str, str]]:
        """(a, b) for every comparison a - b: each column against the reference, then against AdaLoRA, then
        each named variant of a method against that method's own column (fwlora_exact - FW-LoRA)."""
        out = [(lb, self.reference) for lb in self.labels if lb != self.reference] if self.reference in self.labels else []
        ada = self.rival
        if ada:
            out += [(lb, ada) for lb in self.labels if lb not in (self.reference, ada)]
        out += [(lb, self.method_of[lb]) for lb in self.labels
                if self.method_of.get(lb) not in (None, lb) and self.method_of[lb] in self.labels
                and self.method_of[lb] not in (self.reference, ada)]
        return out

    def is_rival(self, label: str) -> bool:
        """A column of the rival method (its own, or a variant of it)."""
        return self.method_of.get(label) == methods.rival_name()

    def hypothesis(self, label: str) -> Any:
        """The column's method's time hypothesis (the registry's), or None."""
        return methods.time_hypothesis(self.method_of.get(label, label))

    def warmup_phase(self, label: str) -> str:
        cls = methods.method_class(self.method_of.get(label, label))
        return cls.warmup_phase if cls else "its warm-up"

    def name(self, label: str) -> str:
        return self.names.get(label) or display_name(label, label)


def display_name(label: str, method: str) -> str:
    """The registry's label for a method's own column (FW-LoRA); a variant's label as it is."""
    return methods.label(method) if label == method else label


def default_reference() -> str:
    """The reference column unless --reference says otherwise: the registry's reference method (LoRA)."""
    return methods.reference_name()


def columns_of(p: Protocol, reference: str | None = None) -> Columns:
    """The protocol's columns from its runs and from the runs its bench planned."""
    method_of: dict[str, str] = {}
    for r in p.runs:
        method_of.setdefault(r.label, r.method)
    variants = _bench_variants(p.bench or {})
    for e in sorted(p.expected):
        method_of.setdefault(e[2], variants.get(e[2], e[2]))
    registry = methods.names()

    def order(label: str) -> tuple[int, str, str]:
        m = method_of[label]
        return registry.index(m) if m in registry else len(registry), m, label

    labels = sorted(method_of, key=order)
    return Columns(labels, method_of, {lb: display_name(lb, method_of[lb]) for lb in labels}, reference)


def _bench_variants(bench: dict[str, Any]) -> dict[str, str]:
    """{variant: method} from bench.json (its own "variants" or its preset's), when it says."""
    preset = bench.get("preset") if isinstance(bench.get("preset"), dict) else {}
    table = bench.get("variants") or preset.get("variants") or {}
    return {k: str(v["method"]) for k, v in table.items() if isinstance(v, dict) and v.get("method")} \
        if isinstance(table, dict) else {}
