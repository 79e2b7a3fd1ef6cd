"""Multi-turn chat data: a conversation of user and assistant turns, trained on the assistant turns only.

With the tokenizer's chat template, the conversation is rendered turn by turn: what each assistant turn adds
after the generation prompt is trained (its text and end-of-turn token), everything else is masked (-100).
Segments are tokenised separately and joined, as the single-turn instruction tasks do, so a response is
tokenised exactly as the model generates it. Without a template: "### User:" / "### Assistant:" blocks, the
assistant text followed by eos. Too long for max_length: the conversation keeps its first tokens; one with
no assistant token left is dropped (and counted in the log).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fwlora.errors import DataError, UserError
from fwlora.tasks.base import type_name
from fwlora.tasks.causal_lm import IGNORE_INDEX
from fwlora.tasks.instruct import InstructionTask

log = logging.getLogger(__name__)

ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[tuple[str, str], ...]  # (role, content), role in user / assistant / system


def messages_example(value: Any, where: str) -> ChatExample:
    """A conversation from a list of {role, content} (or ShareGPT's {from, value}) objects."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of messages, got {type_name(value)}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {k + 1} is {type_name(m)}, expected an object with role and content")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in ROLES:
            raise DataError(f"{where}: message {k + 1} has role {role!r}; use user, assistant or system")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {k + 1} has content {type_name(content)}, expected a string")
        out.append((ROLES[role], content))
    if not any(role == "assistant" for role, _ in out):
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return ChatExample(tuple(out))


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def segments(example: ChatExample, tokenizer: Any) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) pieces whose concatenation is its rendering."""
    if not getattr(tokenizer, "chat_template", None):
        pieces = []
        for role, content in example.messages:
            if role == "assistant":
                pieces += [("### Assistant:\n", False), (content + (tokenizer.eos_token or ""), True), ("\n\n", False)]
            else:
                pieces.append((f"### {role.capitalize()}:\n{content}\n\n", False))
        return pieces
    messages = [{"role": r, "content": c} for r, c in example.messages]
    pieces, done = [], ""
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the tokenizer's chat template does not render a conversation turn by turn "
                            "(a turn's prompt is not a prefix of the conversation): train single turns instead")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = _render(tokenizer, messages, False)[len(done):]
    if rest:
        pieces.append((rest, False))
    return pieces


def encode_conversation(example: ChatExample, tokenizer: Any, max_length: int) -> tuple[dict[str, list[int]] | None, bool]:
    """(input_ids, attention_mask, labels) with labels -100 outside the assistant turns, or None when
    truncation leaves no assistant token; and whether it was cut."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    ids, labels = [], []
    for k, (text, trained) in enumerate(segments(example, tokenizer)):
        piece = list(tokenizer(text, add_special_tokens=(k == 0 and not chat))["input_ids"]) if text else []
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    cut = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, cut
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, cut


@dataclass(frozen=True)
class ChatTask(InstructionTask):
    """An instruction task whose examples are whole conversations (ChatExample): the loss on every assistant
    turn, held-out response loss and perplexity."""

    def encode(self, examples: list, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        if max_length < 2:
            raise UserError(f"--max-length {max_length} is too short for a conversation")
        out, cut, dropped = [], 0, 0
        for e in examples:
            item, was_cut = encode_conversation(e, tokenizer, max_length)
            cut += was_cut
            if item is None:
                dropped += 1
            else:
                out.append(item)
        if cut:
            log.warning("%s: %d of %d conversations are longer than --max-length %d and were cut at the end; %d "
                        "with no assistant token left were dropped", self.name, cut, len(examples), max_length, dropped)
        if not out:
            raise UserError(f"{self.name}: no conversation has an assistant token within --max-length {max_length}")
        return out

    def encode_eval(self, examples: list, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
        items = self.encode(examples, tokenizer, max_length)
        for item in items:  # tokens before the first trained one: where generation would start
            item["prompt_length"] = next(i for i, label in enumerate(item["labels"]) if label != IGNORE_INDEX)
        return items
