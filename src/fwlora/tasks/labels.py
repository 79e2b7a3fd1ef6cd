"""Labelled rows of a user's data as examples: the label column typed (a float column is a regression, any
other a classification with classes sorted by value), every label checked, the evaluation data held to the
training data's classes."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from fwlora.checks import is_real
from fwlora.errors import DataError
from fwlora.tasks.glue import Example
from fwlora.tasks.tables import DataSpec, Table, guess_text_columns, read_splits, require_columns, row_texts, \
    with_evaluation

LABEL_GUESS = "label"


@dataclass(frozen=True)
class LabelledData:
    train: list[Example]
    eval: list[Example]
    source: str
    text_columns: tuple[str, ...]
    classes: tuple[str, ...] | None  # None: regression


def is_float_column(table: Table, column: str) -> bool:
    """Whether a column holds floats (a regression target): by the file's schema where it has one."""
    dtype = getattr(table.features.get(column), "dtype", None)
    if dtype is not None:
        return str(dtype).startswith("float")
    return any(isinstance(row.get(column), float) for row in table.rows)


def raw_labels(table: Table, label: str, regression: bool) -> list[Any]:
    """The label of every row, refused where it is empty (or not a number, in a regression)."""
    out = []
    for i, row in enumerate(table.rows):
        value = row.get(label)
        if value is None or (isinstance(value, str) and not value.strip()) or (
                isinstance(value, float) and math.isnan(value)):
            raise DataError(f"{table.where(i)}: the label ({label!r}) is empty")
        if regression and not is_real(value):
            raise DataError(f"{table.where(i)}: label {value!r} is not a number (the column {label!r} holds "
                            "floats, so the task is a regression)")
        out.append(value)
    return out


def class_names(table: Table, labels: list[Any]) -> tuple[str, ...]:
    names = sorted({str(y) for y in labels}, key=_class_order)
    if len(names) < 2:
        raise DataError(f"{table.source}: every training row has the label {names[0]!r}: a classifier needs "
                        "at least two classes")
    return tuple(names)


def _class_order(name: str) -> tuple[int, float | str]:
    """Integer labels in numeric order (2 before 10), then any other names alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def examples(table: Table, label: str, columns: tuple[str, ...], classes: tuple[str, ...] | None) -> list[Example]:
    """The table's rows as examples: a float target (classes None) or the index of the label among `classes`
    (a label outside them is refused: the evaluation data may not bring a class training never saw)."""
    out = []
    for i, y in enumerate(raw_labels(table, label, regression=classes is None)):
        texts = row_texts(table, i, columns)
        if classes is None:
            out.append(Example(texts, float(y)))
        elif str(y) not in classes:
            raise DataError(f"{table.where(i)}: label {str(y)!r} does not occur in the training data "
                            f"(its classes: {', '.join(classes[:20])})")
        else:
            out.append(Example(texts, classes.index(str(y))))
    return out


@functools.lru_cache(maxsize=4)
def read_labelled(spec: DataSpec) -> LabelledData:
    """The examples of a classification or regression dataset, checked row by row."""
    train_table, eval_table, how = read_splits(spec)
    label = spec.label_column or LABEL_GUESS
    require_columns(train_table, (label,), "--label-column")
    columns = spec.text_columns or guess_text_columns(train_table, label)
    require_columns(train_table, columns, "--text-columns")
    if eval_table is not None:
        require_columns(eval_table, (label, *columns), "the evaluation data needs the training data's columns")
    regression = is_float_column(train_table, label)
    classes = None if regression else class_names(train_table, raw_labels(train_table, label, regression))
    train = examples(train_table, label, columns, classes)
    evaluation = None if eval_table is None else examples(eval_table, label, columns, classes)
    train, evaluation = with_evaluation(spec, train, evaluation)
    return LabelledData(train, evaluation, f"{train_table.source} ({how})", columns, classes)
