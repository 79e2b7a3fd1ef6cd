"""Tasks: GLUE classification (here) and instruction tuning (fwlora.instruct), behind one Task interface.

`get_task(name)` returns an object the training loop drives without asking which kind of task it is:
load -> encode -> collator -> evaluate, plus the model kind to build and the headline metric.

GLUE tasks come from a local directory or the Hugging Face hub.

Local layout (see ../shared/glue/README.md): <data_dir>/<task>/{train,validation}.tsv, UTF-8, a header
`sentence<TAB>label` or `sentence1<TAB>sentence2<TAB>label`, no quoting. The directory comes from
--data-dir or $FWLORA_DATA_DIR; without one, the `datasets` hub loader (nyu-mll/glue) is tried.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from fwlora.errors import DataError, UserError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "FWLORA_DATA_DIR"


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
        raise UserError("stsb is a regression task; fwlora trains classification tasks: " + ", ".join(TASKS))
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: int


def read_lines(path: Path, expected: str) -> list[str]:
    """The lines of a UTF-8 data file (a leading BOM dropped, the final line end not a line), with errors
    that name the file and line: unreadable, not UTF-8, empty (`expected` says what should be there)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if raw.startswith(codecs.BOM_UTF8):  # written by some editors; not part of the data
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    if not text:
        raise DataError(f"{path}: the file is empty (expected {expected})")
    lines = text.split("\n")
    if lines[-1] == "":  # the file's final line end
        lines.pop()
    return lines


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


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """--data-dir, else $FWLORA_DATA_DIR, else None (the hub)."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    return path


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
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as e:  # offline, no cache, hub down: all end the same way for the user
        raise UserError(
            f"could not load GLUE {spec.name}: no local data directory was given (--data-dir or ${DATA_DIR_ENV}) "
            f"and the Hugging Face hub loader failed ({type(e).__name__}: {str(e)[:200]}). "
            f"Fix: pass --data-dir DIR with DIR/{spec.name}/train.tsv and validation.tsv, or run with internet access."
        ) from None
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


def subset(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """A seeded random subset of `limit` examples (the same for every method and run seed), in file order."""
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise UserError(f"--train-limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


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


# ---- the Task interface ----------------------------------------------------------------------------

SEQUENCE_CLASSIFICATION, CAUSAL_LM = "sequence-classification", "causal-lm"  # = models.MODEL_KINDS


@runtime_checkable
class Task(Protocol):
    """What the training loop needs from a task, whatever its kind.

    name, metric (the headline key of evaluate()'s dict), higher_is_better, model_kind
    ("sequence-classification" | "causal-lm", for models.load_backbone), num_labels (None for causal LM).
    """

    name: str
    metric: str
    higher_is_better: bool
    model_kind: str
    num_labels: int | None

    def load(self, data_dir: str | os.PathLike | None = None) -> tuple[list, list, str]:
        """(train examples, evaluation examples, source)."""

    def encode(self, examples: list, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        """Tokenised examples, unpadded, with their `labels`."""

    def encode_eval(self, examples: list, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        """encode() plus what evaluate() needs besides the model inputs (instruction tasks: the prompt
        length and reference answer)."""

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Pads a list of encoded examples into a batch of tensors (training)."""

    def eval_collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """The same for encode_eval() examples; evaluate() expects its batches."""

    def evaluate(self, model: Any, eval_loader: Any, accelerator: Any, tokenizer: Any,
                 max_new_tokens: int | None = None) -> dict[str, float]:
        """Metrics over the whole evaluation set, gathered across processes; restores the model's mode.
        max_new_tokens: the generation limit of tasks that generate (None: the task's default)."""

    def majority_baseline(self, eval_examples: list) -> dict[str, float] | None:
        """The metrics a constant majority-class predictor gets (None where that means nothing)."""


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

    def evaluate(self, model: Any, eval_loader: Any, accelerator: Any, tokenizer: Any = None,
                 max_new_tokens: int | None = None) -> dict[str, float]:
        import torch

        was_training = model.training
        model.eval()
        preds, labels = [], []
        try:
            with torch.no_grad():
                for batch in eval_loader:
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    p, y = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
                    preds.append(p.cpu())
                    labels.append(y.cpu())
        finally:
            model.train(was_training)
        return classification_metrics(torch.cat(labels).numpy(), torch.cat(preds).numpy(), self.is_pair)

    def majority_baseline(self, eval_examples: list[Example]) -> dict[str, float]:
        """Predicting the most frequent evaluation class (the lowest on a tie) for every example:
        accuracy = its rate, MCC = 0, F1 as such a predictor scores it."""
        if not eval_examples:
            raise UserError(f"{self.name}: no evaluation examples")
        labels = np.array([e.label for e in eval_examples])
        majority = int(np.bincount(labels, minlength=self.num_labels).argmax())
        return classification_metrics(labels, np.full_like(labels, majority), self.is_pair)


def get_task(name: str, *, max_new_tokens: int | None = None) -> Task:
    """The Task called `name`: a GLUE task (cola, sst2, ...) or an instruction task (gsm8k, alpaca, dolly).

    max_new_tokens: GSM8K's generation limit for exact match (default 256); other tasks ignore it.
    """
    if name in TASKS:
        return ClassificationTask(TASKS[name])
    from fwlora import instruct

    if name in instruct.INSTRUCTION_TASKS:
        return instruct.get_instruction_task(name, max_new_tokens=max_new_tokens)
    if name == "stsb":
        task_spec(name)  # the regression message
    raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (GLUE classification), "
                    f"{', '.join(instruct.INSTRUCTION_TASKS)} (instruction tuning)")
