"""Batches and held-out loss of causal-LM tasks (instruction and chat data): right padding with labels
masked to -100, and the summed response NLL per example, in chunks that bound the logits' memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and transformers' LM loss) skips
# elements of float32 logits per forward pass in evaluation (512 MiB): rows are chunked to stay under it
LOGITS_BUDGET = 1 << 27


@dataclass(frozen=True)
class CausalLMCollator:
    """Right-pads input_ids with the pad token, attention_mask with 0 and labels with -100. The evaluation
    collator also carries `prompt_length` (a tensor) and `reference` (a list of str | None)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    evaluation: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[i, :n] = torch.tensor(f["attention_mask"], dtype=torch.long)
            labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.evaluation:
            batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features], dtype=torch.long)
            batch["reference"] = [f.get("reference") for f in features]
        return batch


def response_nll(model: Any, batch: dict[str, Any], vocab_size: int | None = None) -> tuple[Any, Any]:
    """(summed negative log-likelihood of the response tokens, their count), per example.

    Rows are run in chunks so that the float32 logits stay under LOGITS_BUDGET elements.
    """
    import torch
    from torch.nn import functional as F

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = max(1, LOGITS_BUDGET // max(1, ids.shape[1] * (vocab_size or 1 << 16)))
    nll, count = [], []
    for start in range(0, ids.shape[0], rows):
        sl = slice(start, start + rows)
        logits = model(input_ids=ids[sl], attention_mask=mask[sl]).logits[:, :-1].float()
        target = labels[sl, 1:]
        nll.append(F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none").sum(1))
        count.append((target != IGNORE_INDEX).sum(1))
    return torch.cat(nll), torch.cat(count)


def vocab_size(model: Any) -> int | None:
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if get is not None else None
    return int(emb.weight.shape[0]) if emb is not None else None
