"""TrainConfig: every setting of one training run, validated where it is built.

The CLI's flags are generated from these fields (their help text included), and --config FILE takes
the same keys from YAML or JSON, so a flag, a config file and a sweep's exported best configuration
all speak one language.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fwlora import methods
from fwlora.errors import UserError

DEFAULT_BUDGET = 0.2  # % of the backbone, when neither --budget nor --rank is given


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    task: str = _f("cola", "task: a GLUE task (cola, sst2, mrpc, rte, qnli, qqp, mnli, wnli) or an instruction task "
                   "(gsm8k, alpaca, dolly, sharegpt); with --dataset, the name your data goes by in reports "
                   "(default there: the file's name)")
    label: str | None = _f(None, "the name reports show this run under (a bench variant of a method); default: "
                           "the method's name")
    method: str = _f(methods.reference_name(), "training method: a registered name (plug-ins via $FWLORA_METHODS)")
    model: str = _f("minilm", "backbone: 'minilm' (bundled, offline), 'mpnet' or 'smollm2' (offline after "
                    "`make backbones`), or a Hugging Face name/path, e.g. roberta-base, Qwen/Qwen3-0.6B")
    head: str = _f("auto", "classification head: 'model' (the architecture's own), 'mean' (mean pooling), "
                   "'auto' (mean for the sentence-embedding backbones minilm and mpnet, model otherwise; see docs/decisions.md)")
    budget: float | None = _f(None, "adapter budget in %% of the backbone's parameters (0.2 = 0.2 %%), mapped to "
                              "the nearest rank; 0.2 when neither --budget nor --rank is given")
    rank: int | None = _f(None, "LoRA rank directly (instead of --budget); AdaLoRA: target_r = rank, init_r = ceil(1.5 rank)")
    target_modules: list[str] | None = _f(None, "comma-separated module-name suffixes to adapt (default: the "
                                          "architecture's attention and feed-forward projections: the README's Backbones table)")
    # your own data (instead of a built-in task's)
    dataset: str | None = _f(None, "your own data: a .csv, .tsv, .json, .jsonl or .parquet file, or a Hugging Face "
                             "dataset name (read with datasets.load_dataset)")
    text_columns: list[str] | None = _f(None, "with --dataset: the text column, or two for sentence pairs (a,b); "
                                        "default: text, sentence or sentence1,sentence2")
    label_column: str | None = _f(None, "with --dataset: the label column (default: label). Strings or integers are "
                                  "classes (any number); floats make the task a regression (MSE, Pearson, Spearman)")
    validation: str | None = _f(None, "with --dataset: the evaluation data: a file, a split name, or a fraction held "
                                "out of the training data (0.1, seeded); default: the dataset's validation split, "
                                "else 0.1")
    prompt_column: str | None = _f(None, "with --dataset: instruction data, the prompt column (with --response-column)")
    response_column: str | None = _f(None, "with --dataset: instruction data, the response column (loss on it only)")
    messages_column: str | None = _f(None, "with --dataset: chat data, a column of messages [{role, content}, ...] "
                                     "(loss on the assistant turns only)")
    # data
    data_dir: str | None = _f(None, "data directory <dir>/<task>/{train,validation}.tsv (GLUE) or "
                              "{train,test}.jsonl (instruction tasks); default: $FWLORA_DATA_DIR, then the hub")
    train_limit: int | None = _f(None, "train on a seeded random subset of this many examples (reduced protocols)")
    eval_limit: int | None = _f(None, "evaluate on the first N validation examples (smoke runs only)")
    max_length: int = _f(128, "truncate inputs to this many tokens")
    max_new_tokens: int = _f(256, "instruction tasks with a generated answer (gsm8k): token limit of greedy generation")
    # optimisation (the protocol of docs/method.md)
    epochs: int = _f(3, "training epochs")
    lr: float = _f(2e-4, "peak learning rate of AdamW")
    batch_size: int = _f(32, "global batch size per optimizer step (over processes and accumulation)")
    grad_accum: int = _f(1, "gradient accumulation: micro-batches per optimizer step")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.06, "linear learning-rate warm-up, as a fraction of all optimizer steps")
    max_grad_norm: float = _f(1.0, "gradient clipping (transformers' default; 0 turns it off)")
    seed: int = _f(0, "seed of initialisation, data order and dropout")
    lora_alpha: float | None = _f(None, "LoRA alpha (default: the method's; 2 x rank for LoRA, a scaling of 2)")
    lora_dropout: float = _f(0.0, "dropout on the adapters' input")
    # engineering
    mixed_precision: str = _f("no", "no, bf16 (CPU or GPU) or fp16 (GPU, with a gradient scaler)")
    dtype: str = _f("float32", "the backbone's weights: float32, bfloat16 or float16 (the adapters train in float32)")
    tf32: str = _f("on", "float32 matmuls on CUDA's TF32 tensor cores: on (several times faster on A100/H100, "
                   "10-bit mantissa products) or off (full float32); no effect on the CPU")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, ~30 %% slower)")
    load_in_4bit: bool = _f(False, "QLoRA: the backbone quantised to 4 bits (NF4) by bitsandbytes, where it runs")
    report_to: str = _f("tensorboard", "experiment tracking through Accelerate: tensorboard (event files in the run "
                        "directory), mlflow, wandb or none")
    eval_batch_size: int = _f(256, "evaluation batch size (evaluation runs longest first, so a batch pads little)")
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice)")
    output_dir: str = _f("runs/train", "run directory (config, metrics, per-matrix statistics, adapter)")
    log_every: int = _f(10, "log loss, learning rate, gradient norm and step time to the trackers, refresh the "
                        "progress bar and check for NaN/inf every this many steps")
    checkpoint_every: int | None = _f(None, "also save a checkpoint every this many optimizer steps (atomic; the "
                                      "previous one is kept until the new one is whole); default: about every "
                                      "10 minutes of a run's steps, never on runs under 200 steps; 0 = epoch ends only")
    # the method's own settings, by their flat names (from the method's Settings dataclass; see fwlora.methods)
    method_settings: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})

    # keys that do not change the result: a run directory may be reused with other values
    NON_IDENTITY = ("output_dir", "data_dir", "threads", "log_every", "eval_batch_size", "checkpoint_every", "label",
                    "report_to", "gradient_checkpointing")
    DEFAULT_TASK = "cola"
    TRACKERS = ("tensorboard", "mlflow", "wandb", "none")
    DTYPES = ("float32", "bfloat16", "float16")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> UserError:
            return UserError(f"{name.replace('_', '-')} = {getattr(self, name)!r}: {why}")

        owner = methods.get(self.method)  # an unknown method is refused with the list of known ones
        if self.head not in ("auto", "model", "mean"):
            raise bad("head", "use auto, model or mean")
        if self.budget is not None and self.rank is not None:
            raise UserError("give --budget or --rank, not both")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise bad("budget", "must be a positive percentage")
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length", "eval_batch_size", "log_every",
                     "train_limit", "eval_limit", "threads", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, "must be >= 1")
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise bad("checkpoint_every", "must be >= 0 (0: checkpoints at epoch ends only)")
        if self.batch_size % self.grad_accum:
            raise bad("batch_size", f"must be divisible by grad-accum = {self.grad_accum}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a positive number")
        for name in ("weight_decay", "max_grad_norm", "lora_dropout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise bad(name, "must be a finite number >= 0")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "must lie in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must lie in [0, 1)")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise bad("lora_alpha", "must be a positive number")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise bad("mixed_precision", "use no, bf16 or fp16")
        if self.tf32 not in ("on", "off"):
            raise bad("tf32", "use on or off")
        if self.dtype not in self.DTYPES:
            raise bad("dtype", "use " + ", ".join(self.DTYPES))
        if self.report_to not in self.TRACKERS:
            raise bad("report_to", "use " + ", ".join(self.TRACKERS))
        self._check_data()
        # the method's settings: defaults filled in, then checked by its own Settings dataclass
        stray = sorted(set(self.method_settings) - set(owner.defaults()))
        if stray:
            raise UserError(f"{', '.join(stray)}: not settings of method {self.method}")
        self.method_settings = {**owner.defaults(), **self.method_settings}
        self.method_options()  # its checks (a None default that depends on other settings stays None here;
        # the run records the value it resolved to in result.json's method_info)

    def _check_data(self) -> None:
        own = {k: getattr(self, k) for k in ("text_columns", "label_column", "validation", "prompt_column",
                                             "response_column", "messages_column") if getattr(self, k) is not None}
        if self.dataset is None:
            if own:
                raise UserError(f"--{next(iter(own)).replace('_', '-')} describes your own data: give --dataset FILE too")
            return
        if not self.dataset.strip():
            raise UserError("--dataset is empty: give a file or a hub dataset name")
        if (self.prompt_column is None) != (self.response_column is None):
            raise UserError("--prompt-column and --response-column go together (instruction data)")
        if self.messages_column and self.prompt_column:
            raise UserError("give --messages-column (chat data) or --prompt-column/--response-column, not both")
        if (self.messages_column or self.prompt_column) and (self.text_columns or self.label_column):
            raise UserError("instruction data has a prompt and a response (or messages), not text and label columns")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise UserError(f"--text-columns {','.join(self.text_columns)}: give one column, or two for pairs")
        if self.task == self.DEFAULT_TASK:  # not named: the data's own name, not a GLUE task's
            self.task = data_name(self.dataset)

    def budget_percent(self) -> float | None:
        """The adapter budget in % that picks the rank: None when --rank gives it; DEFAULT_BUDGET when
        neither --rank nor --budget is given."""
        if self.rank is not None:
            return None
        return self.budget if self.budget is not None else DEFAULT_BUDGET

    def method_options(self) -> Any:
        """The method's Settings object (validated; run-filled fields left at their defaults)."""
        return _method_settings(self.method, self.method_settings)

    def __getattr__(self, name: str) -> Any:
        # cfg.lambda_fw and the like: the run's method's settings read like fields
        settings = self.__dict__.get("method_settings")
        if settings is not None and name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__} of method {self.__dict__.get('method')!r} has no setting {name!r}")

    # ---- conversions --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Flat: the shared settings and the method's own, as config files and --flags name them."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "method_settings"}
        out.update(self.method_settings)
        return {k: list(v) if isinstance(v, list) else v for k, v in out.items()}

    def identity(self) -> dict[str, Any]:
        """The settings that decide the result (what a run directory must agree on to be resumed)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NON_IDENTITY}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Shared settings, plus method settings: the run's method keeps its own; another method's settings
        (a preset's lambda_fw for a LoRA run) are accepted and left out."""
        shared = {f.name for f in fields(cls) if f.name != "method_settings"}
        owned = methods.all_settings()
        unknown = sorted(set(values) - shared - set(owned))
        if unknown:
            known = sorted(shared | set(owned))
            raise UserError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        method = values.get("method", _FIELD_DEFAULTS["method"])
        checked = {k: _coerce(k, v, source, _FIELD_TYPES[k]) for k, v in values.items() if k in shared}
        given = {k: _coerce(k, v, source, type_name(owned[k][1].type)) for k, v in values.items() if k in owned}
        # another method's settings are checked too (a bad value is never silently carried), then left out
        for name in {owned[k][0].name for k in given} - {method}:
            _method_settings(name, {k: v for k, v in given.items() if owned[k][0].name == name})
        own = {k: v for k, v in given.items() if owned[k][0].name == method}
        try:
            return cls(**checked, method_settings=own)
        except TypeError as e:
            raise UserError(f"{source}: {e}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})




def data_name(dataset: str) -> str:
    """The name a user's data goes by in reports: the file's stem, or the hub dataset's last part."""
    path = Path(dataset)
    name = path.stem if path.suffix else dataset.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def type_name(annotation: Any) -> str:
    """A field's type as written ("float", "int | None"), whether the module that declared it has
    `from __future__ import annotations` (a string) or not (a class or a typing object)."""
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1] + " | None"
    return text


_FIELD_TYPES = {f.name: type_name(f.type) for f in fields(TrainConfig)}
_FIELD_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


_SETTING_ERROR = re.compile(r"^(?:\w+\.)?(\w+) = (.*)$", re.S)


def _method_settings(method: str, flat: dict[str, Any]) -> Any:
    """Build a method's Settings from flat settings; its own checks' errors become one UserError that names
    the setting as the command line does (--fw-beta), whatever exception type the method's library uses."""
    cls = methods.get(method)
    try:
        return cls.make_settings(flat)
    except (ValueError, TypeError) as e:  # FWLoRAError and UserError are ValueErrors
        message = str(e)
        found = _SETTING_ERROR.match(message)
        fields_ = {f.name for f in cls.setting_fields()}
        if found and found.group(1) in fields_:
            message = f"{cls.flat_name(found.group(1)).replace('_', '-')} = {found.group(2)}"
        raise UserError(message) from None


def _coerce(name: str, value: Any, source: str, kind: str) -> Any:
    """Check a config-file value against the field's type (ints may stand for floats; lists from strings)."""
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
    if kind.startswith("int | float"):  # a count of steps, or a fraction of the run
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {name} must be a number (steps, or a fraction of the run), got {value!r}")
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
    """The shared settings (each method's own come from fwlora.methods.all_settings())."""
    return [f for f in fields(TrainConfig) if f.name != "method_settings"]
