"""Loading a backbone for a task (its head, its pad token), the target modules per architecture, and the
parameter counts behind a budget. The offline backbones (minilm, mpnet, smollm2) are found by backbones.py.

Precision: weights load in float32 unless --dtype says otherwise; on a GPU pass --mixed-precision bf16
(Accelerate autocasts the forward pass; the LoRA weights and the optimizer state stay float32). Under a
bfloat16/float16 backbone the task head stays float32 and casts its input to its own dtype, as PEFT does for
its float32 adapters and transformers for its _keep_in_fp32_modules, so that no autocast is needed.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fwlora.backbones import MEAN_POOL_BACKBONES, OFFLINE_BACKBONE, SMOLLM2, resolve_backbone
from fwlora.errors import UserError
from fwlora.tasks.base import CAUSAL_LM, SEQUENCE_CLASSIFICATION

log = logging.getLogger(__name__)

MODEL_KINDS = (SEQUENCE_CLASSIFICATION, CAUSAL_LM)  # what a task's model_kind may say

# The one table of target modules, by config.model_type. Suffixes, matched by PEFT at a "." boundary; none
# of them matches a task head (classifier, score, pooler) or a causal LM's lm_head.
# Encoders: docs/method.md's six matrix types (AdaLoRA's set): query, key, value, attention output, both
# feed-forward; "output.dense" covers the attention output and the FFN output, "intermediate.dense" the
# FFN input. MPNet names the attention matrices attn.{q,k,v,o}; its "output.dense" is the FFN output only.
# Decoders: the seven projections q, k, v, o, gate, up, down. Phi-3 fuses q/k/v into qkv_proj and gate/up
# into gate_up_proj: its four matrices are adapted as they are (one LoRA pair per fused matrix).
# Gemma 3 means the text models (model_type gemma3_text: 270M, 1B); the multimodal gemma3 checkpoints would
# also match the vision tower's q/k/v_proj and are left to --target-modules.
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet")  # no causal LM of their own
_ENCODER_SIX = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"]
_DECODER_SEVEN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
TARGET_MODULES: dict[str, list[str]] = {
    **{arch: list(_ENCODER_SIX) for arch in ENCODER_TYPES if arch != "mpnet"},
    "mpnet": ["attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
              "intermediate.dense", "output.dense"],
    **{arch: list(_DECODER_SEVEN) for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "phi3": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
}
HEAD_NAMES = ("classifier", "score", "pooler")  # trained in full by every method, counted apart from the budget


def default_head(model_name: str) -> str:
    """The classification head --head auto picks: "mean" for sentence-embedding backbones, "model" otherwise.

    all-MiniLM-L6-v2 and all-mpnet-base-v2 were trained for mean pooling (sentence-transformers); their
    [CLS] pooler is an untrained leftover (docs/decisions.md, "The head of the offline backbone"). A local
    sentence-transformers directory whose pooling is the mean (1_Pooling/config.json) gets it too. Decoders
    get their architecture's own head: a linear `score` on the last non-pad token.
    """
    if model_name in MEAN_POOL_BACKBONES:
        return "mean"
    pooling = Path(model_name).expanduser() / "1_Pooling" / "config.json"
    try:
        if pooling.is_file() and json.loads(pooling.read_text(encoding="utf-8")).get("pooling_mode_mean_tokens"):
            return "mean"
    except (OSError, ValueError):
        pass
    return "model"


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
        logits = self.classifier(self.dropout(pooled.to(self.classifier.weight.dtype)))
        loss = None
        if labels is not None:
            if logits.shape[-1] == 1:  # regression (a float label), as transformers' heads do it
                loss = nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_backbone(name: str, task: Any, head: str = "model", kind: str | None = None, dtype: str = "float32",
                  load_in_4bit: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a task (a data.Task: its model_kind and num_labels), or for a number of labels
    (an int: a sequence classifier, unless kind says otherwise).

    kind "sequence-classification": encoders and decoders alike; head "model" (the architecture's own:
    [CLS] for encoders, last non-pad token for decoders) or "mean" (MeanPoolClassifier).
    kind "causal-lm" (instruction tasks): the model with its LM head; num_labels and head are ignored.
    Either way the tokenizer has a pad token (its eos when it has none) and the model's config the same
    pad_token_id, which a decoder's own head uses to find each sequence's last token. dtype: the weights'
    precision (float32 by default); load_in_4bit: QLoRA's NF4 base through bitsandbytes (refused with the reason
    where it cannot run). The task head stays float32 either way (keep_head_float32).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if task is None or isinstance(task, int):
        num_labels, kind = task, kind or SEQUENCE_CLASSIFICATION
    else:
        num_labels, kind = task.num_labels, kind or task.model_kind
    if kind not in MODEL_KINDS:
        raise UserError(f"unknown model kind {kind!r}: use {' or '.join(MODEL_KINDS)}")
    path = resolve_backbone(name)
    tokenizer = _from_pretrained(AutoTokenizer, path)
    weights = precision_kwargs(dtype, load_in_4bit)
    if kind == CAUSAL_LM:
        from transformers import AutoConfig

        arch = getattr(_from_pretrained(AutoConfig, path), "model_type", None)
        if arch in ENCODER_TYPES:
            raise UserError(f"{name} is an encoder ({arch}); instruction tasks train a causal language model: "
                            f"use a decoder, e.g. --model {SMOLLM2} (offline) or Qwen/Qwen3-0.6B")
        model = _from_pretrained(AutoModelForCausalLM, path, **weights)
    elif head == "model":
        model = _from_pretrained(AutoModelForSequenceClassification, path, num_labels=num_labels, **weights)
    elif head == "mean":
        model = MeanPoolClassifier(_from_pretrained(AutoModel, path, **_no_pooler(path), **weights), num_labels)
    else:
        raise UserError(f"unknown head {head!r}: use 'model' or 'mean'")
    set_pad_token(model, tokenizer, name)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # training never reuses a KV cache; generation asks for one itself
    if dtype != "float32" or load_in_4bit:
        keep_head_float32(model)
    return model, tokenizer


def keep_head_float32(model: nn.Module) -> None:
    """Keep the task head (classifier, score, a BERT pooler) in float32 under a low-precision backbone, its input
    cast to float32 by a forward pre-hook.

    The head is trained in full: bfloat16 weights would lose AdamW's small updates to rounding. Without
    autocast a float32 head meets bfloat16 activations ("expected m1 and m2 to have the same dtype"); the
    hook casts them, the gradient flows back through the cast in the backbone's dtype, and the logits and
    the loss come out float32. PEFT's modules_to_save copy (a deepcopy) keeps the hook.
    """
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEAD_NAMES:
            module.float()
            module.register_forward_pre_hook(_cast_input_to_own_dtype, with_kwargs=True)


def _cast_input_to_own_dtype(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)

    def cast(v: Any) -> Any:
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype else v

    if dtype is None:
        return args, kwargs
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def precision_kwargs(dtype: str, load_in_4bit: bool) -> dict[str, Any]:
    """from_pretrained's arguments for --dtype and --load-in-4bit (QLoRA: NF4 weights, bfloat16 compute)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: use {', '.join(DTYPES)}")
    if not load_in_4bit:
        return {"dtype": DTYPES[dtype]} if dtype != "float32" else {}
    reason = quantization_unavailable()
    if reason:
        raise UserError(f"--load-in-4bit needs bitsandbytes' 4-bit kernels: {reason}")
    from transformers import BitsAndBytesConfig

    compute = DTYPES[dtype] if dtype != "float32" else torch.bfloat16
    cuda = torch.cuda.is_available()
    local_index = 0
    if cuda:
        from accelerate import PartialState

        local_index = PartialState().local_process_index  # the process group the Accelerator will reuse
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True),
            "device_map": quantized_device_map(local_index, cuda)}


def quantized_device_map(local_index: int, cuda: bool) -> dict[str, int | str]:
    """Where a 4-bit backbone loads: whole on this process's own GPU (its local rank under torchrun), or the CPU.

    bitsandbytes quantises while loading, on a device; without a device_map transformers picks the current
    CUDA device, cuda:0 for every rank that has not set its own, so all ranks would pile onto one GPU.
    """
    return {"": int(local_index) if cuda else "cpu"}


def quantization_unavailable() -> str | None:
    """Why 4-bit loading cannot run here (None when it can): bitsandbytes missing, or no device it supports."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return "the package bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit

        device = "cuda" if torch.cuda.is_available() else "cpu"
        probe = torch.randn(64, 64, device=device)
        packed, state = quantize_4bit(probe, quant_type="nf4")
        dequantize_4bit(packed, state)
    except Exception as e:  # the CPU backend missing, a CUDA library mismatch: the message says which
        return f"bitsandbytes cannot quantize on this machine ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass; with frozen embeddings the inputs must require grad."""
    inner = model.encoder if isinstance(model, MeanPoolClassifier) else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(inner).__name__} does not support gradient checkpointing")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(inner, "enable_input_require_grads"):
        inner.enable_input_require_grads()


def _no_pooler(path: str) -> dict[str, Any]:
    """add_pooling_layer=False for encoders that have a pooler (it would be untrained, unused weights)."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(path)
        cls = AutoModel._model_mapping[type(config)]
    except Exception:  # an unknown architecture: from_pretrained will say so
        return {}
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


def set_pad_token(model: nn.Module, tokenizer: Any, name: str = "the model") -> None:
    """Give the tokenizer a pad token (its eos if it has none) and the model's config the same id.

    Decoders pool at the last token that is not the pad token (rightmost, so left and right padding both
    work); with pad = eos, a sequence that itself ends in eos is pooled at the token before it.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {name} has neither a pad nor an eos token to pad batches with; "
                            "use a checkpoint whose tokenizer defines one")
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in {id(config): config, id(text_config): text_config}.values():
        if getattr(c, "pad_token_id", None) != tokenizer.pad_token_id:
            c.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


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
    """Parameter counts behind a budget.

    Budgets count embeddings: `backbone` is every parameter but the task head, token (and position)
    embeddings included, a tied input/output embedding once and an untied LM head as a second embedding.
    That is how LoRA and AdaLoRA state their budgets (% of the pre-trained model: roberta-base's 125M
    include its 39M embeddings) and how every result so far was computed. Decoders put a large share there
    (SmolLM2-135M: 28.3M of 134.5M, 21 %; Qwen3-0.6B: 156M of 596M, 26 %), so the same % buys a smaller
    rank than it would if embeddings were left out; `embedding` reports that share so it can be shown.
    """

    backbone: int  # everything but the head (the denominator of a budget), embeddings included
    head: int
    per_rank: int  # adapter parameters per unit of LoRA rank
    adapted_matrices: int
    embedding: int = 0  # the part of `backbone` in embedding matrices (nn.Embedding, an untied LM head)

    @property
    def backbone_without_embeddings(self) -> int:
        return self.backbone - self.embedding


def count_params(model: nn.Module, targets: list[str]) -> ParamCounts:
    head = sum(p.numel() for n, p in model.named_parameters() if _is_head(n))
    total = sum(p.numel() for p in model.parameters())  # a shared (tied) tensor once
    names = adapted_linear_names(model, targets)
    modules = dict(model.named_modules())
    shapes = [(modules[n].in_features, modules[n].out_features) for n in names]
    embedding_params: dict[int, int] = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding) and not _is_head(n):
            embedding_params[id(m.weight)] = m.weight.numel()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output, nn.Linear):
        embedding_params[id(output.weight)] = output.weight.numel()
    return ParamCounts(backbone=total - head, head=head, per_rank=sum(a + b for a, b in shapes),
                       adapted_matrices=len(names), embedding=sum(embedding_params.values()))


def head_modules(model: nn.Module) -> list[str]:
    """Top-level names of the head's modules, for PEFT's modules_to_save."""
    present = {part for n, _ in model.named_modules() for part in n.split(".")}
    return [h for h in HEAD_NAMES if h in present]


def check_head_not_adapted(peft_model: nn.Module) -> None:
    """Refuse adapters inside the task head (it is trained in full and counted apart from the budget)."""
    head_lora = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and _is_head(n)]
    if head_lora:
        raise UserError(f"target modules reach the task head ({head_lora[0]}); pass narrower --target-modules")


def adapted_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """LoRA/AdaLoRA layers by name, the head excluded (for per-matrix statistics)."""
    from peft.tuners.lora.layer import LoraLayer

    return {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and not _is_head(n)}


def delta_weights(peft_model: nn.Module) -> dict[str, Any]:
    """dW_m of every adapted matrix on the CPU: its two factors (a fwlora.lowrank.LowRank: LoRA's s B A,
    AdaLoRA's B (A * E) alpha / r), or PEFT's dense get_delta_weight (float32) where it is no such product."""
    from fwlora.methods.base import short_name
    from fwlora.methods.deltas import peft_delta

    out = {}
    with torch.no_grad():
        for name, layer in adapted_layers(peft_model).items():
            adapter = layer.active_adapters[0]
            factors = peft_delta(layer, adapter)
            out[short_name(name)] = (factors.cpu() if factors is not None
                                     else layer.get_delta_weight(adapter).detach().float().cpu())
    return out

