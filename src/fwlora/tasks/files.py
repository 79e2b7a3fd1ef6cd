"""Your own data: a CSV, TSV, JSON, JSON Lines or Parquet file, or a Hugging Face dataset, read through
`datasets.load_dataset`, as a classification, regression, instruction or chat task.

    --dataset tickets.csv --text-columns body --label-column team      classification (any number of classes)
    --dataset sts.csv --text-columns s1,s2 --label-column score          regression (a float label: MSE loss,
                                                                         Pearson and Spearman, as STS-B)
    --dataset pairs.jsonl --prompt-column prompt --response-column answer   instruction tuning
    --dataset chats.jsonl --messages-column messages                     chat: the loss on the assistant turns

Labels may be strings or integers (classes, sorted by value; the names come back in predictions) or floats
(regression). Evaluation data: --validation FILE, a split name of a hub dataset, or a fraction of the
training data held out (seeded); by default the dataset's validation split, else 0.1. Every problem with the
data is one DataError naming the file and the row: a missing column, an empty text, one class only, a label
the training data never shows.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fwlora.errors import DataError, UserError
from fwlora.tasks.base import SEQUENCE_CLASSIFICATION, holdout_split
from fwlora.tasks.glue import Example, classification_metrics, encode
from fwlora.tasks.instruct import Fields, InstructExample, InstructionTask
from fwlora.tasks.chat import ChatExample, ChatTask

log = logging.getLogger(__name__)

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
DEFAULT_HOLDOUT = 0.1
TEXT_GUESSES = (("text",), ("sentence",), ("sentence1", "sentence2"), ("question", "answer"))
LABEL_GUESS = "label"


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


# ---- reading --------------------------------------------------------------------------------------------------

def _builder(path: Path) -> tuple[str, dict[str, Any], int | None]:
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(f"{path}: unknown file type {suffix or '(no suffix)'}; use .csv, .tsv, .json, .jsonl or .parquet")
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
        from fwlora.tasks.instruct import read_jsonl

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
    v = spec.validation
    if v is not None and _fraction(v) is None:
        if is_local(v) or local:
            return train, read_file(Path(v).expanduser()), f"evaluation: {v}"
        return train, read_hub(spec.dataset, v), f"evaluation: split {v}"
    if v is None and not local and _hub_has_split(spec.dataset, "validation"):
        return train, read_hub(spec.dataset, "validation"), "evaluation: split validation"
    fraction = _fraction(v) if v is not None else DEFAULT_HOLDOUT
    return train, None, f"evaluation: {fraction:g} of the training rows held out (seed 0)"


def _fraction(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not 0 < value < 1:
        raise UserError(f"--validation {text}: a held-out fraction lies in (0, 1)")
    return value


def _require(table: Table, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{table.source}: no column {missing[0]!r} ({what}); its columns are "
                        f"{', '.join(table.columns) or 'none'}")


def _texts(table: Table, i: int, columns: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for c in columns:
        value = table.rows[i].get(c)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{table.where(i)}: column {c!r} is empty")
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise DataError(f"{table.where(i)}: column {c!r} holds {type(value).__name__}, expected text")
        out.append(str(value))
    return tuple(out)


def guess_text_columns(table: Table, label: str | None) -> tuple[str, ...]:
    for guess in TEXT_GUESSES:
        if all(c in table.columns for c in guess):
            return guess
    strings = [c for c in table.columns if c != label and getattr(table.features.get(c), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return (strings[0],)
    raise DataError(f"{table.source}: which column is the text? Give --text-columns (one, or two for pairs); its "
                    f"columns are {', '.join(table.columns)}")


# ---- labelled data: classification and regression ---------------------------------------------------------

def _is_float_column(table: Table, column: str) -> bool:
    dtype = getattr(table.features.get(column), "dtype", None)
    if dtype is not None:
        return str(dtype).startswith("float")
    return any(isinstance(r.get(column), float) for r in table.rows)


@dataclass(frozen=True)
class LabelledData:
    train: list[Example]
    eval: list[Example]
    source: str
    text_columns: tuple[str, ...]
    classes: tuple[str, ...] | None  # None: regression


@functools.lru_cache(maxsize=4)
def read_labelled(spec: DataSpec) -> LabelledData:
    """The examples of a classification or regression dataset, checked row by row."""
    train_table, eval_table, how = read_splits(spec)
    label = spec.label_column or LABEL_GUESS
    _require(train_table, (label,), "--label-column")
    columns = spec.text_columns or guess_text_columns(train_table, label)
    _require(train_table, columns, "--text-columns")
    regression = _is_float_column(train_table, label)
    if eval_table is not None:
        _require(eval_table, (label, *columns), "the evaluation data needs the training data's columns")

    def raw_labels(table: Table) -> list[Any]:
        out = []
        for i, row in enumerate(table.rows):
            value = row.get(label)
            if value is None or (isinstance(value, str) and not value.strip()) or (
                    isinstance(value, float) and math.isnan(value)):
                raise DataError(f"{table.where(i)}: the label ({label!r}) is empty")
            if regression and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DataError(f"{table.where(i)}: label {value!r} is not a number (the column {label!r} holds "
                                "floats, so the task is a regression)")
            out.append(value)
        return out

    train_labels = raw_labels(train_table)
    train_texts = [_texts(train_table, i, columns) for i in range(len(train_table.rows))]
    if regression:
        classes = None
        train = [Example(t, float(y)) for t, y in zip(train_texts, train_labels)]
    else:
        names = sorted({str(y) for y in train_labels}, key=_class_order)
        if len(names) < 2:
            raise DataError(f"{train_table.source}: every training row has the label {names[0]!r}: a classifier needs "
                            "at least two classes")
        classes = tuple(names)
        index = {n: k for k, n in enumerate(names)}
        train = [Example(t, index[str(y)]) for t, y in zip(train_texts, train_labels)]
    if eval_table is None:
        fraction = _fraction(spec.validation) if spec.validation is not None else DEFAULT_HOLDOUT
        train, evaluation = holdout_split(train, fraction, max_eval=None)
    else:
        eval_labels = raw_labels(eval_table)
        evaluation = []
        for i, y in enumerate(eval_labels):
            texts = _texts(eval_table, i, columns)
            if classes is None:
                evaluation.append(Example(texts, float(y)))
            elif str(y) not in classes:
                raise DataError(f"{eval_table.where(i)}: label {str(y)!r} does not occur in the training data "
                                f"(its classes: {', '.join(classes[:20])})")
            else:
                evaluation.append(Example(texts, classes.index(str(y))))
    return LabelledData(train, evaluation, f"{train_table.source} ({how})", columns, classes)


def _class_order(name: str) -> tuple[int, float | str]:
    """Integer labels in numeric order (2 before 10), then any other names alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


@dataclass(frozen=True)
class LabelledFileTask:
    """Classification (any number of classes, string or integer labels) or regression (a float label) on a
    user's data: a sequence classifier or regressor with the backbone's head."""

    spec: DataSpec
    data: LabelledData = field(compare=False, hash=False, repr=False)
    model_kind: str = SEQUENCE_CLASSIFICATION

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def regression(self) -> bool:
        return self.data.classes is None

    @property
    def metric(self) -> str:
        return "pearson" if self.regression else "accuracy"

    @property
    def higher_is_better(self) -> bool:
        return True

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.data.classes)

    @property
    def label_names(self) -> list[str] | None:
        return None if self.regression else list(self.data.classes)

    @property
    def text_columns(self) -> tuple[str, ...]:
        return self.data.text_columns

    def load(self, data_dir: str | os.PathLike | None = None) -> tuple[list[Example], list[Example], str]:
        return self.data.train, self.data.eval, self.data.source

    def encode(self, examples: list[Example], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        return encode(examples, tokenizer, max_length)

    encode_eval = encode

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    eval_collator = collator

    def evaluate(self, model: Any, eval_loader: Any, accelerator: Any, tokenizer: Any = None,
                 max_new_tokens: int | None = None) -> dict[str, float]:
        from fwlora.tasks.glue import gather_logits

        logits, labels = gather_logits(model, eval_loader, accelerator)
        return self.metrics(labels, logits)

    def metrics(self, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
        if self.regression:
            return regression_metrics(labels, logits.reshape(len(labels), -1)[:, 0])
        return labelled_metrics(labels, logits.argmax(-1), self.num_labels)

    def majority_baseline(self, eval_examples: list[Example]) -> dict[str, float] | None:
        if self.regression or not eval_examples:
            return None
        labels = np.array([e.label for e in eval_examples])
        majority = int(np.bincount(labels, minlength=self.num_labels).argmax())
        return labelled_metrics(labels, np.full_like(labels, majority), self.num_labels)


def labelled_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, float]:
    """accuracy, MCC and macro F1 over the classes."""
    from sklearn.metrics import f1_score

    out = classification_metrics(labels, preds, pair=False)
    out["f1_macro"] = float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)), zero_division=0.0))
    return out


def regression_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (0 where a side is constant) and the mean squared error."""
    from scipy.stats import pearsonr, spearmanr

    labels, preds = np.asarray(labels, dtype=float), np.asarray(preds, dtype=float)
    constant = np.ptp(labels) == 0 or np.ptp(preds) == 0
    return {"pearson": 0.0 if constant else float(pearsonr(labels, preds)[0]),
            "spearman": 0.0 if constant else float(spearmanr(labels, preds)[0]),
            "mse": float(np.mean((labels - preds) ** 2))}


# ---- instruction and chat data ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def read_instructions(spec: DataSpec) -> tuple[list, list, str]:
    """Prompt/response rows (InstructExample) or chat rows (ChatExample), checked row by row."""
    train_table, eval_table, how = read_splits(spec)

    def rows(table: Table) -> list:
        if spec.messages_column:
            from fwlora.tasks.chat import messages_example

            _require(table, (spec.messages_column,), "--messages-column")
            return [messages_example(r.get(spec.messages_column), table.where(i)) for i, r in enumerate(table.rows)]
        _require(table, (spec.prompt_column, spec.response_column), "--prompt-column / --response-column")
        out = []
        for i in range(len(table.rows)):
            prompt, response = _texts(table, i, (spec.prompt_column, spec.response_column))
            out.append(InstructExample(prompt, "", response))
        return out

    train = rows(train_table)
    if eval_table is None:
        fraction = _fraction(spec.validation) if spec.validation is not None else DEFAULT_HOLDOUT
        train, evaluation = holdout_split(train, fraction, max_eval=None)
    else:
        evaluation = rows(eval_table)
    return train, evaluation, f"{train_table.source} ({how})"


@dataclass(frozen=True)
class InstructionFileTask(InstructionTask):
    """A user's prompt/response data: the instruction tasks' masked response loss and chat template."""

    spec: DataSpec | None = None

    def load(self, data_dir: str | os.PathLike | None = None) -> tuple[list, list, str]:
        return read_instructions(self.spec)


@dataclass(frozen=True)
class ChatFileTask(ChatTask):
    """A user's chat data (a messages column): the loss on every assistant turn."""

    spec: DataSpec | None = None

    def load(self, data_dir: str | os.PathLike | None = None) -> tuple[list, list, str]:
        return read_instructions(self.spec)


def dataset_task(settings: Any) -> Any:
    """The task of a user's --dataset, from the run's settings."""
    spec = DataSpec.from_settings(settings)
    if spec.messages_column or spec.prompt_column:
        kind = ChatFileTask if spec.messages_column else InstructionFileTask
        return kind(name=spec.name, hub_id=spec.dataset, hub_config=None, fields=Fields("prompt", None, "response"),
                    metric="eval_loss", higher_is_better=False, eval_split=None, spec=spec)
    return LabelledFileTask(spec, read_labelled(spec))


__all__ = ["ChatExample", "DataSpec", "LabelledFileTask", "InstructionFileTask", "ChatFileTask", "dataset_task",
           "labelled_metrics", "regression_metrics", "read_file"]
