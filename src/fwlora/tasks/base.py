"""The Task interface the training loop drives, the task registry, and what every task's data code shares.

A task is an object the loop calls without asking which kind it is: load -> encode -> collator -> evaluate,
plus the model kind to build (a sequence classifier or a causal LM) and the headline metric. Built-in tasks
register a factory under their name (glue.py, instruct.py, sharegpt.py); a user's own file is a task built
from its path and columns (files.py).
"""

from __future__ import annotations

import codecs
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from fwlora.errors import DataError, UserError

DATA_DIR_ENV = "FWLORA_DATA_DIR"
SEQUENCE_CLASSIFICATION, CAUSAL_LM = "sequence-classification", "causal-lm"  # the model kinds (models.py builds them)


@runtime_checkable
class Task(Protocol):
    """What the training loop needs from a task, whatever its kind.

    name, metric (the headline key of evaluate()'s dict), higher_is_better, model_kind
    ("sequence-classification" | "causal-lm", for models.load_backbone), num_labels (None for causal LM;
    1 for regression), label_names (class names in label order, or None).
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


# ---- the registry ---------------------------------------------------------------------------------------

TaskFactory = Callable[..., Task]
REGISTRY: dict[str, TaskFactory] = {}
KINDS: dict[str, str] = {}  # name -> what kind of task it is, for messages ("GLUE classification", ...)


def register_task(name: str, factory: TaskFactory, kind: str) -> None:
    """Make a task available by name: factory(**options) -> Task (options: max_new_tokens)."""
    REGISTRY[name] = factory
    KINDS[name] = kind


def task_names(kind: str | None = None) -> list[str]:
    return [n for n in REGISTRY if kind is None or KINDS[n] == kind]


def get_task(name: str, *, max_new_tokens: int | None = None) -> Task:
    """The registered task called `name` (a GLUE task, an instruction task, sharegpt)."""
    if name not in REGISTRY:
        kinds: dict[str, list[str]] = {}
        for n, k in KINDS.items():
            kinds.setdefault(k, []).append(n)
        known = ", ".join(f"{', '.join(ns)} ({k})" for k, ns in kinds.items())
        hint = " (stsb is a regression task: train it as your own data, --dataset FILE with a float label column)" \
            if name == "stsb" else ""
        raise UserError(f"unknown task {name!r}{hint}; known tasks: {known}; or bring your own with --dataset FILE")
    return REGISTRY[name](max_new_tokens=max_new_tokens)


# ---- what the data code of every task shares --------------------------------------------------------------

def hub_dataset(hub_id: str, config: str | None, what: str, fix: str) -> Any:
    """datasets.load_dataset(hub_id[, config]), or one UserError saying that neither a local copy was given nor
    the hub answered, and how to fix it (offline, a missing cache and a hub that is down end alike for a user)."""
    try:
        import datasets

        return datasets.load_dataset(hub_id, config) if config else datasets.load_dataset(hub_id)
    except Exception as e:
        raise UserError(f"could not load {what}: no local data directory was given (--data-dir or ${DATA_DIR_ENV}) "
                        f"and the Hugging Face hub loader failed for {hub_id} ({type(e).__name__}: {str(e)[:200]}). "
                        f"Fix: {fix}") from None


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


def read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, value) for each line of a JSON Lines file; every problem is one DataError naming the
    file and line. Lines end at LF (a CR before it is dropped); a final line end is optional; an empty line
    is an error (JSON Lines has exactly one value per line); a UTF-8 BOM is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = read_lines(path, "one JSON object per line")
    rows = []
    for lineno, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            raise DataError(f"{path}:{lineno}: empty line (JSON Lines has one JSON object per line)")
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: not valid JSON (nested too deeply)") from None
    if not rows:
        raise DataError(f"{path}: the file has no lines")
    return rows


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """--data-dir, else $FWLORA_DATA_DIR, else None (the hub)."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist")
    return path


def subset(examples: list, limit: int | None, seed: int = 0) -> list:
    """A seeded random subset of `limit` examples (the same for every method and run seed), in file order."""
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise UserError(f"--train-limit must be >= 1, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


HOLDOUT_FRACTION, HOLDOUT_MAX, HOLDOUT_SEED = 0.05, 1000, 0


def holdout_split(examples: list, fraction: float = HOLDOUT_FRACTION, max_eval: int | None = HOLDOUT_MAX,
                  seed: int = HOLDOUT_SEED) -> tuple[list, list]:
    """(train, held out): a seeded random slice of round(fraction n) examples (1 .. max_eval), both in
    file order; the same slice for every method and run seed."""
    n = len(examples)
    if n < 2:
        raise UserError(f"{n} example(s): too few to hold out an evaluation slice")
    k = max(1, round(fraction * n))
    k = min(k, max_eval, n - 1) if max_eval is not None else min(k, n - 1)
    chosen = set(random.Random(seed).sample(range(n), k))
    return [e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen]


def type_name(value: Any) -> str:
    """How a JSON value's type reads in a message."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
