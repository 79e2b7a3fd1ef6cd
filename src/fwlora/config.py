"""TrainConfig: every setting of one training run, validated where it is built.

The CLI's flags are generated from these fields (their help text included), and --config FILE takes
the same keys from YAML or JSON, so a flag, a config file and a sweep's exported best configuration
all speak one language.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fwlora.errors import UserError

METHODS = ("lora", "adalora", "fwlora")
DEFAULT_BUDGET = 0.2  # % of the backbone, when neither --budget nor --rank is given


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    task: str = _f("cola", "GLUE task: cola, sst2, mrpc, rte, qnli, qqp, mnli, wnli")
    method: str = _f("lora", "lora, adalora or fwlora")
    model: str = _f("minilm", "backbone: 'minilm' (bundled, offline) or a Hugging Face name/path, e.g. roberta-base")
    head: str = _f("auto", "classification head: 'model' (the architecture's own), 'mean' (mean pooling), "
                   "'auto' (mean for minilm, model otherwise; see README)")
    budget: float | None = _f(None, "adapter budget in %% of the backbone's parameters (0.2 = 0.2 %%), mapped to "
                              "the nearest rank; 0.2 when neither --budget nor --rank is given")
    rank: int | None = _f(None, "LoRA rank directly (instead of --budget); AdaLoRA: target_r = rank, init_r = ceil(1.5 rank)")
    target_modules: list[str] | None = _f(None, "comma-separated module-name suffixes to adapt (default: the six "
                                          "matrix types of METHOD.md for the architecture)")
    # data
    data_dir: str | None = _f(None, "GLUE directory <dir>/<task>/{train,validation}.tsv (default: $FWLORA_DATA_DIR, then the hub)")
    train_limit: int | None = _f(None, "train on a seeded random subset of this many examples (reduced protocols)")
    eval_limit: int | None = _f(None, "evaluate on the first N validation examples (smoke runs only)")
    max_length: int = _f(128, "truncate inputs to this many tokens")
    # optimisation (METHOD.md's protocol)
    epochs: int = _f(3, "training epochs")
    lr: float = _f(2e-4, "peak learning rate of AdamW")
    batch_size: int = _f(32, "global batch size per optimizer step (over processes and accumulation)")
    grad_accum: int = _f(1, "gradient accumulation: micro-batches per optimizer step")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.06, "linear learning-rate warm-up, as a fraction of all optimizer steps")
    max_grad_norm: float = _f(1.0, "gradient clipping (transformers' default; 0 turns it off)")
    seed: int = _f(0, "seed of initialisation, data order and dropout")
    lora_alpha: float | None = _f(None, "LoRA alpha (default 2 x rank, a scaling of 2)")
    lora_dropout: float = _f(0.0, "dropout on the adapters' input")
    # FW-LoRA
    lambda_fw: float = _f(1e-4, "FW-LoRA: penalty weight lambda")
    fw_warmup_steps: int = _f(500, "FW-LoRA: K, optimizer steps that measure the Fisher scores")
    fw_beta: float = _f(0.98, "FW-LoRA: EMA factor of the Fisher scores")
    fw_estimator: str = _f("exact", "FW-LoRA: 'exact' or 'sketch' (cheaper, unbiased) Fisher estimate")
    fw_sketch_size: int = _f(8, "FW-LoRA: columns of the sketch")
    fw_measure_every: int = _f(1, "FW-LoRA: measure one warm-up step in this many")
    fw_normalization: str = _f("sum", "FW-LoRA: I = F / sum F ('sum', METHOD.md) or F / max F ('max')")
    allow_late_penalty: bool = _f(False, "allow fw_warmup_steps >= total steps (the penalty would never start)")
    # AdaLoRA (PEFT's), configured as its authors' GLUE scripts, scaled to the run
    adalora_alpha: float | None = _f(None, "AdaLoRA alpha (its update is scaled by alpha / init_r; default: see README)")
    adalora_orth_reg: float = _f(0.1, "AdaLoRA orthogonal regulariser weight (authors' GLUE scripts: 0.1)")
    adalora_tinit: float = _f(0.12, "AdaLoRA initial phase without pruning, fraction of steps")
    adalora_tfinal: float = _f(0.48, "AdaLoRA final phase at the target budget, fraction of steps")
    adalora_delta: float = _f(0.0015, "AdaLoRA: one budget allocation every this fraction of steps (>= 1 step)")
    adalora_beta1: float = _f(0.85, "AdaLoRA sensitivity EMA")
    adalora_beta2: float = _f(0.85, "AdaLoRA uncertainty EMA")
    # engineering
    mixed_precision: str = _f("no", "no, bf16 (CPU or GPU) or fp16 (GPU, with a gradient scaler)")
    eval_batch_size: int = _f(128, "evaluation batch size")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)")
    output_dir: str = _f("runs/train", "run directory (config, metrics, per-matrix statistics, adapter)")
    log_every: int = _f(10, "refresh the progress bar and check for NaN/inf every this many steps")

    # keys that do not change the result: a run directory may be reused with other values
    NON_IDENTITY = ("output_dir", "data_dir", "threads", "log_every", "eval_batch_size")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> UserError:
            return UserError(f"{name.replace('_', '-')} = {getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            raise bad("method", f"unknown method; use one of {', '.join(METHODS)}")
        if self.head not in ("auto", "model", "mean"):
            raise bad("head", "use auto, model or mean")
        if self.budget is not None and self.rank is not None:
            raise UserError("give --budget or --rank, not both")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise bad("budget", "must be a positive percentage")
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length", "eval_batch_size", "log_every",
                     "train_limit", "eval_limit", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, "must be >= 1")
        if self.batch_size % self.grad_accum:
            raise bad("batch_size", f"must be divisible by grad-accum = {self.grad_accum}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a positive number")
        for name in ("weight_decay", "max_grad_norm", "lambda_fw", "adalora_orth_reg", "lora_dropout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad(name, "must be a finite number >= 0")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "must lie in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must lie in [0, 1)")
        for name in ("fw_beta", "adalora_beta1", "adalora_beta2"):
            if not 0 < getattr(self, name) < 1:
                raise bad(name, "must lie strictly between 0 and 1")
        if self.fw_warmup_steps < 1:
            raise bad("fw_warmup_steps", "must be >= 1")
        if self.fw_estimator not in ("exact", "sketch"):
            raise bad("fw_estimator", "use exact or sketch")
        if self.fw_normalization not in ("sum", "max"):
            raise bad("fw_normalization", "use sum or max")
        if self.fw_sketch_size < 1 or not 1 <= self.fw_measure_every <= self.fw_warmup_steps:
            raise bad("fw_measure_every", "must lie in [1, fw-warmup-steps] (and fw-sketch-size >= 1)")
        for name in ("lora_alpha", "adalora_alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise bad(name, "must be a positive number")
        for name in ("adalora_tinit", "adalora_tfinal", "adalora_delta"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be a fraction in [0, 1)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise bad("mixed_precision", "use no, bf16 or fp16")

    # ---- conversions --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the result (what a run directory must agree on to be resumed)."""
        return {k: v for k, v in asdict(self).items() if k not in self.NON_IDENTITY}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        checked = {k: _coerce(k, v, source) for k, v in values.items()}
        try:
            return cls(**checked)
        except TypeError as e:
            raise UserError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a config-file value against the field's type (ints may stand for floats; lists from strings)."""
    kind = str(_FIELD_TYPES[name])
    if value is None:
        if "None" in kind:
            return None
        raise UserError(f"{source}: {name} may not be null")
    if kind.startswith("list"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{source}: {name} must be a list of strings, got {value!r}")
        return value
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise UserError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: {name} must be an integer, got {value!r}")
        return value
    if kind.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range
            raise UserError(f"{source}: {name} is too large a number") from None
    if not isinstance(value, str):
        raise UserError(f"{source}: {name} must be a string, got {value!r}")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of TrainConfig keys (dashes or underscores), with file-named errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path}: cannot read it ({e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, RecursionError, yaml.YAMLError) as e:  # ValueError: JSONDecodeError, or an int over 4300 digits
        raise UserError(f"config file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def config_fields() -> list[dataclasses.Field]:
    return list(fields(TrainConfig))
