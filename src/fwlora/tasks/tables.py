"""A user's data read into tables: one file (CSV, TSV, JSON, JSON Lines, Parquet) or a hub dataset through
`datasets.load_dataset`, the evaluation data chosen (--validation), and the columns resolved and checked.
Every problem is one DataError naming the file and the row."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fwlora.checks import is_real
from fwlora.errors import DataError, UserError
from fwlora.tasks.base import holdout_split

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DEFAULT_HOLDOUT = 0.1
TEXT_GUESSES = (("text",), ("sentence",), ("sentence1", "sentence2"), ("question", "answer"))


@dataclass(frozen=True)
class DataSpec:
    """A user's data as the settings describe it (hashable: the key under which it is read once)."""

    name: str
    dataset: str
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = None
    validation: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    messages_column: str | None = None

    @classmethod
    def from_settings(cls, s: Any) -> "DataSpec":
        return cls(name=s.task, dataset=s.dataset, text_columns=tuple(s.text_columns) if s.text_columns else None,
                   label_column=s.label_column, validation=s.validation, prompt_column=s.prompt_column,
                   response_column=s.response_column, messages_column=s.messages_column)


@dataclass(frozen=True)
class Table:
    """One split of a user's data: its rows, its column names and how to name a row in a message."""

    source: str  # the file or hub name (and split)
    rows: list[dict[str, Any]]
    columns: list[str]
    features: dict[str, Any]
    line_offset: int | None  # file line of row 0 (CSV/TSV: 2, after the header; JSON Lines: 1); None: row numbers

    def where(self, i: int) -> str:
        if self.line_offset is None:
            return f"{self.source}: row {i + 1}"
        return f"{self.source}:{i + self.line_offset}"


def _builder(path: Path) -> tuple[str, dict[str, Any], int | None]:
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(f"{path}: unknown file type {suffix or '(no suffix)'}; "
                        "use .csv, .tsv, .json, .jsonl or .parquet")
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    offset = 2 if suffix in (".csv", ".tsv") else 1 if suffix == ".jsonl" else None
    return BUILDERS[suffix], kwargs, offset


def read_file(path: Path) -> Table:
    """Every row of one data file, through datasets.load_dataset; a malformed file is one DataError."""
    import datasets

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    builder, kwargs, offset = _builder(path)
    if path.suffix.lower() == ".jsonl":
        from fwlora.tasks.base import read_jsonl

        for lineno, row in read_jsonl(path):  # names the line of bad JSON, which pyarrow's reader does not
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object (one row), got {type(row).__name__}")
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **kwargs)
    except Exception as e:  # pandas' / pyarrow's parse errors name the line; keep their first line
        message = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot read it as {path.suffix.lstrip('.').upper()} ({message})") from None
    if len(ds) == 0:
        raise DataError(f"{path}: the file has no rows")
    return Table(str(path), ds.to_list(), list(ds.column_names), dict(ds.features), offset)


def read_hub(name: str, split: str) -> Table:
    import datasets

    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, no such dataset, no such split
        raise UserError(f"--dataset {name}: could not load split {split!r} from the Hugging Face hub or its cache "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); a local file "
                        "(.csv, .tsv, .json, .jsonl, .parquet) works offline") from None
    return Table(f"hub:{name}/{split}", ds.to_list(), list(ds.column_names), dict(ds.features), None)


def _hub_has_split(name: str, split: str) -> bool:
    import datasets

    try:
        return split in datasets.get_dataset_split_names(name)
    except Exception:
        return False


class _quiet_datasets:
    """datasets' progress bars and cache chatter off while a user's file is read."""

    def __enter__(self):
        import datasets

        self._was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        import datasets

        if self._was:
            datasets.utils.logging.enable_progress_bar()


def is_local(dataset: str) -> bool:
    return Path(dataset).suffix.lower() in BUILDERS or os.path.exists(dataset)


def read_splits(spec: DataSpec) -> tuple[Table, Table | None, str]:
    """(training table, evaluation table or None for a held-out fraction, how the evaluation data was chosen)."""
    local = is_local(spec.dataset)
    train = read_file(Path(spec.dataset).expanduser()) if local else read_hub(spec.dataset, "train")
    validation = spec.validation
    if validation is not None and _as_fraction(validation) is None:
        if is_local(validation) or local:
            return train, read_file(Path(validation).expanduser()), f"evaluation: {validation}"
        return train, read_hub(spec.dataset, validation), f"evaluation: split {validation}"
    if validation is None and not local and _hub_has_split(spec.dataset, "validation"):
        return train, read_hub(spec.dataset, "validation"), "evaluation: split validation"
    return train, None, f"evaluation: {holdout_fraction(validation):g} of the training rows held out (seed 0)"


def _as_fraction(text: str) -> float | None:
    """--validation as a held-out fraction, or None when it names a file or a split instead."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not 0 < value < 1:
        raise UserError(f"--validation {text}: a held-out fraction lies in (0, 1)")
    return value


def holdout_fraction(validation: str | None) -> float:
    return DEFAULT_HOLDOUT if validation is None else _as_fraction(validation)


def with_evaluation(spec: DataSpec, train: list, evaluation: list | None) -> tuple[list, list]:
    """(training, evaluation) examples: the evaluation data's own when it has any (`evaluation` not None),
    else a seeded fraction of the training examples held out."""
    if evaluation is not None:
        return train, evaluation
    return holdout_split(train, holdout_fraction(spec.validation), max_eval=None)


def require_columns(table: Table, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{table.source}: no column {missing[0]!r} ({what}); its columns are "
                        f"{', '.join(table.columns) or 'none'}")


def row_texts(table: Table, i: int, columns: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for c in columns:
        value = table.rows[i].get(c)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{table.where(i)}: column {c!r} is empty")
        if not (isinstance(value, str) or is_real(value)):
            raise DataError(f"{table.where(i)}: column {c!r} holds {type(value).__name__}, expected text")
        out.append(str(value))
    return tuple(out)


def guess_text_columns(table: Table, label: str | None) -> tuple[str, ...]:
    for guess in TEXT_GUESSES:
        if all(c in table.columns for c in guess):
            return guess
    strings = [c for c in table.columns
               if c != label and getattr(table.features.get(c), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return (strings[0],)
    raise DataError(f"{table.source}: which column is the text? Give --text-columns (one, or two for pairs); its "
                    f"columns are {', '.join(table.columns)}")
