"""A protocol's columns: the labels (a method, or a bench's named variant of one) in registry order, the
method behind each, the printed names, the reference and the rival, and what the registry says of each."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fwlora import methods
from fwlora.methods.base import Method, TimeHypothesis, first_column
from fwlora.report.load import Protocol


@dataclass(frozen=True)
class Columns:
    """A protocol's columns: labels in order, the method behind each, the printed names, the reference (the
    column every other is compared with and timed against) and the rival (the registry's; None when it is
    the reference or absent)."""

    labels: tuple[str, ...] = field(metadata={"json": "methods"})  # summary.json's name, which readers use
    method_of: Mapping[str, str]
    names: Mapping[str, str]
    reference: str
    rival: str | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        rival = methods.rival_name()
        object.__setattr__(self, "rival", rival if rival in self.labels and self.reference != rival else None)

    def pairs(self) -> list[tuple[str, str]]:
        """(a, b) for every comparison a - b: each column against the reference, then against the rival, then
        each named variant of a method against that method's own column."""
        ref, rival = self.reference, self.rival
        out = [(lb, ref) for lb in self.labels if lb != ref] if ref in self.labels else []
        if rival:
            out += [(lb, rival) for lb in self.labels if lb not in (ref, rival)]
        out += [(lb, self.method_of[lb]) for lb in self.labels
                if self.method_of.get(lb) not in (None, lb) and self.method_of[lb] in self.labels
                and self.method_of[lb] not in (ref, rival)]
        return out

    def method(self, label: str) -> str:
        return self.method_of.get(label, label)

    def method_class(self, label: str) -> type[Method] | None:
        """The registry's class of the column's method (None for one not registered here: an old run's)."""
        return methods.method_class(self.method(label))

    def is_rival(self, label: str) -> bool:
        """A column of the rival method (its own, or a variant of it)."""
        return self.method_of.get(label) == methods.rival_name()

    def hypothesis(self, label: str) -> TimeHypothesis | None:
        """The column's method's time hypothesis (the registry's), or None."""
        return methods.time_hypothesis(self.method(label))

    def warmup_phase(self, label: str) -> str:
        cls = self.method_class(label)
        return cls.warmup_phase if cls else Method.warmup_phase

    def name(self, label: str) -> str:
        return self.names.get(label) or display_name(label, label)

    def column_of(self, method: str) -> str | None:
        """The column of a method's own runs, else its first variant's."""
        return first_column(self.method_of, method)

    def drawing(self, figure: str) -> str | None:
        """The column of the first registered method that draws this figure (the registry's `figures`)."""
        return next((lb for lb in (self.column_of(m) for m in methods.with_figure(figure)) if lb), None)


def display_name(label: str, method: str) -> str:
    """The registry's label for a method's own column; a variant's label as it is."""
    return methods.label(method) if label == method else label


def default_reference() -> str:
    """The reference column unless --reference says otherwise: the registry's reference method."""
    return methods.reference_name()


def budget_method_name() -> str:
    """How the report names the method whose adapter at a rank defines that rank's budget (the registry's
    reference method: its % of the backbone is the budget every column is held to)."""
    return methods.label(methods.reference_name())


def columns_of(p: Protocol, reference: str | None = None) -> Columns:
    """The protocol's columns from its runs and from the runs its bench planned."""
    method_of: dict[str, str] = {}
    for r in p.runs:
        method_of.setdefault(r.label, r.method)
    variants = p.bench.variants if p.bench else {}
    for e in sorted(p.expected):
        method_of.setdefault(e[2], variants.get(e[2], e[2]))
    registry = methods.names()

    def order(label: str) -> tuple[int, str, str]:
        m = method_of[label]
        return registry.index(m) if m in registry else len(registry), m, label

    labels = tuple(sorted(method_of, key=order))
    return Columns(labels, method_of, {lb: display_name(lb, method_of[lb]) for lb in labels},
                   reference or default_reference())
