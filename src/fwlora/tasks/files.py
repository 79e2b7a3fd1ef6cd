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

This module makes the tasks; tables.py reads the rows and chooses the evaluation data, labels.py types
and checks the labels.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fwlora.tasks.base import SEQUENCE_CLASSIFICATION
from fwlora.tasks.chat import ChatExample, ChatTask
from fwlora.tasks.glue import Example, classification_metrics, encode
from fwlora.tasks.instruct import Fields, InstructExample, InstructionTask
from fwlora.tasks.labels import LabelledData, read_labelled
from fwlora.tasks.tables import DataSpec, Table, guess_text_columns, read_file, read_splits, require_columns, \
    row_texts, with_evaluation


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

            require_columns(table, (spec.messages_column,), "--messages-column")
            return [messages_example(r.get(spec.messages_column), table.where(i)) for i, r in enumerate(table.rows)]
        require_columns(table, (spec.prompt_column, spec.response_column), "--prompt-column / --response-column")
        pairs = (row_texts(table, i, (spec.prompt_column, spec.response_column)) for i in range(len(table.rows)))
        return [InstructExample(prompt, "", response) for prompt, response in pairs]

    train, evaluation = with_evaluation(spec, rows(train_table), None if eval_table is None else rows(eval_table))
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


# read_file and guess_text_columns are re-exported: prediction reads a user's file through this module
__all__ = ["ChatExample", "DataSpec", "LabelledData", "LabelledFileTask", "InstructionFileTask", "ChatFileTask",
           "dataset_task", "guess_text_columns", "labelled_metrics", "regression_metrics", "read_file"]
