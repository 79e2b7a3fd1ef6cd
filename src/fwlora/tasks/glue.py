"""GLUE classification tasks (cola, sst2, mrpc, rte, qnli, qqp, mnli, wnli) from a local directory or the hub,
and the classification Task that a user's own labelled file also uses (files.py).

Local layout (the shared GLUE copy's README): <data_dir>/<task>/{train,validation}.tsv, UTF-8, a header
`sentence<TAB>label` or `sentence1<TAB>sentence2<TAB>label`, no quoting. The directory comes from
--data-dir or $FWLORA_DATA_DIR; without one, the `datasets` hub loader (nyu-mll/glue) is tried.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fwlora.errors import DataError, UserError
from fwlora.tasks.base import SEQUENCE_CLASSIFICATION, hub_dataset, read_lines, register_task, resolve_data_dir

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TaskSpec:
    """A GLUE classification task: its text columns, classes, headline metric and hub split names."""

    name: str
    text_fields: tuple[str, ...]
    num_labels: int
    metric: str  # the headline metric: "mcc" or "accuracy"
    validation_split: str = "validation"

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def header(self) -> tuple[str, ...]:
        return self.text_fields + ("label",)


_SINGLE = ("sentence",)
_PAIR = ("sentence1", "sentence2")
TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", _SINGLE, 2, "mcc"),
    "sst2": TaskSpec("sst2", _SINGLE, 2, "accuracy"),
    "mrpc": TaskSpec("mrpc", _PAIR, 2, "accuracy"),
    "qqp": TaskSpec("qqp", _PAIR, 2, "accuracy"),
    "qnli": TaskSpec("qnli", _PAIR, 2, "accuracy"),
    "rte": TaskSpec("rte", _PAIR, 2, "accuracy"),
    "wnli": TaskSpec("wnli", _PAIR, 2, "accuracy"),
    "mnli": TaskSpec("mnli", _PAIR, 3, "accuracy", validation_split="validation_matched"),
}
# The hub's column names differ from the local files' for a few pair tasks.
_HUB_COLUMNS = {"qqp": ("question1", "question2"), "qnli": ("question", "sentence"), "mnli": ("premise", "hypothesis")}


def task_spec(name: str) -> TaskSpec:
    if name == "stsb":
        raise UserError("stsb is a regression task: train it as your own data (--dataset FILE with a float label "
                        "column); GLUE's classification tasks: " + ", ".join(TASKS))
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: int


def read_tsv(path: Path, spec: TaskSpec) -> list[Example]:
    """Read one split; every malformed line is a DataError naming the file and line.

    Lines end at LF (a CR before it is dropped, so CRLF files read too); fields are split at every tab,
    with no quoting (the same as csv with QUOTE_NONE, without its limits: no field-size cap, no error
    on a lone CR, and no other Unicode line breaks that str.splitlines would cut a sentence at).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected <data-dir>/{spec.name}/{path.name})")
    lines = read_lines(path, f"a header {'<TAB>'.join(spec.header)}")
    rows = [line.removesuffix("\r").split("\t") for line in lines]
    header = rows[0]
    if tuple(header) != spec.header:
        raise DataError(f"{path}:1: header is {'<TAB>'.join(header)[:200]!r}, expected {'<TAB>'.join(spec.header)!r}")
    examples = []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != len(spec.header):
            what = ("empty line" if row == [""] else "no tab") if len(row) == 1 else f"{len(row)} fields"
            raise DataError(f"{path}:{lineno}: {what}, expected {len(spec.header)} tab-separated fields")
        *texts, label = row
        digits = label.strip()
        if not _INTEGER.fullmatch(digits):
            raise DataError(f"{path}:{lineno}: label {label[:40]!r} is not an integer")
        try:
            value = int(digits)
        except ValueError:  # over Python's 4300-digit limit for int()
            value = -1
        if not 0 <= value < spec.num_labels:
            raise DataError(f"{path}:{lineno}: label {digits[:40]} is not a class of {spec.name} "
                            f"(0..{spec.num_labels - 1})")
        examples.append(Example(tuple(texts), value))
    if not examples:
        raise DataError(f"{path}: the file has a header but no examples")
    return examples


_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "1_0" or Arabic-Indic digits


def load_task(task: str, data_dir: str | os.PathLike | None = None) -> tuple[list[Example], list[Example], str]:
    """(train, validation, source) of a task, from the local directory or else the hub."""
    spec = task_spec(task)
    root = resolve_data_dir(data_dir)
    if root is not None:
        folder = root / spec.name
        if not folder.is_dir():
            raise DataError(f"{folder}: no such directory (the data directory {root} has no {spec.name}/ folder)")
        return read_tsv(folder / "train.tsv", spec), read_tsv(folder / "validation.tsv", spec), str(folder)
    return _load_from_hub(spec)


def _load_from_hub(spec: TaskSpec) -> tuple[list[Example], list[Example], str]:
    ds = hub_dataset("nyu-mll/glue", spec.name, f"GLUE {spec.name}",
                     f"pass --data-dir DIR with DIR/{spec.name}/train.tsv and validation.tsv, or run with internet access.")
    columns = _HUB_COLUMNS.get(spec.name, spec.text_fields)

    def convert(split: str) -> list[Example]:
        return [Example(tuple(row[c] for c in columns), int(row["label"])) for row in ds[split]]

    return convert("train"), convert(spec.validation_split), f"hub:nyu-mll/glue/{spec.name}"


def _has_no_pair_template(tokenizer: Any) -> bool:
    count = getattr(tokenizer, "num_special_tokens_to_add", None)
    try:
        return count is not None and count(pair=True) == 0
    except Exception:  # a tokenizer that cannot say: keep its own pair handling
        return False


PAIR_SEPARATOR = "\n"


def encode(examples: list[Example], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Tokenise (truncating to max_length, no padding: the collator pads each batch).

    A pair goes through the tokenizer's pair template ([SEP] for BERT, </s></s> for RoBERTa/MPNet). Many
    decoder tokenizers have none and would glue the two sentences together token to token: for them the
    pair is one text, the sentences joined by a line break (truncated at the end).
    """
    columns = [list(c) for c in zip(*(e.texts for e in examples))]
    if len(columns) == 2 and _has_no_pair_template(tokenizer):
        columns = [[f"{a}{PAIR_SEPARATOR}{b}" for a, b in zip(*columns)]]
    enc = tokenizer(*columns, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": e.label} for i, e in enumerate(examples)]


# ---- metrics ---------------------------------------------------------------------------------------


def classification_metrics(labels: np.ndarray, preds: np.ndarray, pair: bool) -> dict[str, float]:
    """accuracy and MCC, and F1 for pair tasks (binary; macro over classes for MNLI)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    labels, preds = np.asarray(labels), np.asarray(preds)
    out = {"accuracy": float(accuracy_score(labels, preds)), "mcc": float(matthews_corrcoef(labels, preds))}
    if pair:
        out["f1"] = float(f1_score(labels, preds, average="binary" if labels.max() <= 1 else "macro", zero_division=0.0))
    return out


def gather_logits(model: Any, eval_loader: Any, accelerator: Any) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the whole evaluation set, gathered across processes (float32 numpy arrays, in the
    loader's order); restores the model's mode."""
    import torch

    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        with torch.no_grad():
            for batch in eval_loader:
                out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                z, y = accelerator.gather_for_metrics((out.float(), batch["labels"]))
                logits.append(z.cpu())
                labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


@dataclass(frozen=True)
class ClassificationTask:
    """A GLUE task as a Task: a sequence classifier, accuracy / MCC / F1 from the argmax of the logits."""

    spec: TaskSpec
    higher_is_better: bool = True
    model_kind: str = SEQUENCE_CLASSIFICATION

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    @property
    def is_pair(self) -> bool:
        return self.spec.is_pair

    def load(self, data_dir: str | os.PathLike | None = None) -> tuple[list[Example], list[Example], str]:
        return load_task(self.name, data_dir)

    def encode(self, examples: list[Example], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        return encode(examples, tokenizer, max_length)

    def encode_eval(self, examples: list[Example], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        return encode(examples, tokenizer, max_length)

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def eval_collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return self.collator(tokenizer)

    @property
    def label_names(self) -> None:
        return None  # GLUE's labels are the integers of its files

    def evaluate(self, model: Any, eval_loader: Any, accelerator: Any, tokenizer: Any = None,
                 max_new_tokens: int | None = None) -> dict[str, float]:
        logits, labels = gather_logits(model, eval_loader, accelerator)
        return self.metrics(labels, logits)

    def metrics(self, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
        return classification_metrics(labels, logits.argmax(-1), self.is_pair)

    def majority_baseline(self, eval_examples: list[Example]) -> dict[str, float]:
        """Predicting the most frequent evaluation class (the lowest on a tie) for every example:
        accuracy = its rate, MCC = 0, F1 as such a predictor scores it."""
        if not eval_examples:
            raise UserError(f"{self.name}: no evaluation examples")
        labels = np.array([e.label for e in eval_examples])
        majority = int(np.bincount(labels, minlength=self.num_labels).argmax())
        return classification_metrics(labels, np.full_like(labels, majority), self.is_pair)


for _name in TASKS:
    register_task(_name, lambda _n=_name, **_: ClassificationTask(TASKS[_n]), "GLUE classification")
