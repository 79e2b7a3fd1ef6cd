"""TrainConfig: every setting of one training run, validated where it is built.

The CLI's flags are generated from these fields (their help text included), and --config FILE takes
the same keys from YAML or JSON, so a flag, a config file and a sweep's exported best configuration
all speak one language. A value is converted by its field's type (typing.get_type_hints), and the run's
method's own settings arrive as that method's typed Settings object (`cfg.method_settings`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from fwlora import methods
from fwlora.checks import is_int, is_real
from fwlora.errors import UserError

DEFAULT_BUDGET = 0.2  # % of the backbone, when neither --budget nor --rank is given


class _DefaultTask(str):
    """The task name when none was given: with --dataset the data's own name replaces it, while an explicit
    `--task cola` (a plain str) stays as given."""


def _setting(default: Any, help: str, **kw: Any) -> Any:
    """A field of TrainConfig: its default and the help text its flag shows."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    task: str = _setting(_DefaultTask("cola"), "task: a GLUE task (cola, sst2, mrpc, rte, qnli, qqp, mnli, "
                         "wnli) or an instruction task (gsm8k, alpaca, dolly, sharegpt); with --dataset, "
                         "the name your data goes by in reports (default there: the file's name)")
    label: str | None = _setting(None, "the name reports show this run under (a bench variant of a "
                                 "method); default: the method's name")
    method: str = _setting(methods.reference_name(), "training method: a registered name (plug-ins via "
                           "$FWLORA_METHODS)")
    model: str = _setting("minilm", "backbone: 'minilm' (bundled, offline), 'mpnet' or 'smollm2' (offline "
                          "after `make backbones`), or a Hugging Face name/path, e.g. roberta-base, "
                          "Qwen/Qwen3-0.6B")
    head: str = _setting("auto", "classification head: 'model' (the architecture's own), 'mean' (mean "
                         "pooling), 'auto' (mean for the sentence-embedding backbones minilm and mpnet, "
                         "model otherwise; see docs/decisions.md)")
    budget: float | None = _setting(None, "adapter budget in %% of the backbone's parameters (0.2 = 0.2 "
                                    "%%), mapped to the nearest rank; 0.2 when neither --budget nor --rank "
                                    "is given")
    rank: int | None = _setting(None, "LoRA rank directly (instead of --budget); a method that moves ranks "
                                "between matrices ends at this average rank (its own flags say how it starts)")
    target_modules: list[str] | None = _setting(None, "comma-separated module-name suffixes to adapt "
                                                "(default: the architecture's attention and feed-forward "
                                                "projections: the README's Backbones table)")
    # your own data (instead of a built-in task's)
    dataset: str | None = _setting(None, "your own data: a .csv, .tsv, .json, .jsonl or .parquet file, or "
                                   "a Hugging Face dataset name (read with datasets.load_dataset)")
    text_columns: list[str] | None = _setting(None, "with --dataset: the text column, or two for sentence "
                                              "pairs (a,b); default: text, sentence or sentence1,sentence2")
    label_column: str | None = _setting(None, "with --dataset: the label column (default: label). Strings "
                                        "or integers are classes (any number); floats make the task a "
                                        "regression (MSE, Pearson, Spearman)")
    validation: str | None = _setting(None, "with --dataset: the evaluation data: a file, a split name, or "
                                      "a fraction held out of the training data (0.1, seeded); default: "
                                      "the dataset's validation split, else 0.1")
    prompt_column: str | None = _setting(None, "with --dataset: instruction data, the prompt column (with "
                                         "--response-column)")
    response_column: str | None = _setting(None, "with --dataset: instruction data, the response column "
                                           "(loss on it only)")
    messages_column: str | None = _setting(None, "with --dataset: chat data, a column of messages [{role, "
                                           "content}, ...] (loss on the assistant turns only)")
    # data
    data_dir: str | None = _setting(None, "data directory <dir>/<task>/{train,validation}.tsv (GLUE) or "
                                    "{train,test}.jsonl (instruction tasks); default: $FWLORA_DATA_DIR, "
                                    "then the hub")
    train_limit: int | None = _setting(None, "train on a seeded random subset of this many examples "
                                       "(reduced protocols)")
    eval_limit: int | None = _setting(None, "evaluate on the first N validation examples (smoke runs only)")
    max_length: int = _setting(128, "truncate inputs to this many tokens")
    max_new_tokens: int = _setting(256, "instruction tasks with a generated answer (gsm8k): token limit of "
                                   "greedy generation")
    # optimisation (the protocol of docs/method.md)
    epochs: int = _setting(3, "training epochs")
    lr: float = _setting(2e-4, "peak learning rate of AdamW")
    batch_size: int = _setting(32, "global batch size per optimizer step (over processes and accumulation)")
    grad_accum: int = _setting(1, "gradient accumulation: micro-batches per optimizer step")
    weight_decay: float = _setting(0.0, "AdamW weight decay")
    warmup_ratio: float = _setting(0.06, "linear learning-rate warm-up, as a fraction of all optimizer "
                                   "steps")
    max_grad_norm: float = _setting(1.0, "gradient clipping (transformers' default; 0 turns it off)")
    seed: int = _setting(0, "seed of initialisation, data order and dropout")
    lora_alpha: float | None = _setting(None, "LoRA alpha (default: the method's; 2 x rank for LoRA, a "
                                        "scaling of 2)")
    lora_dropout: float = _setting(0.0, "dropout on the adapters' input")
    # engineering
    mixed_precision: str = _setting("no", "no, bf16 (CPU or GPU) or fp16 (GPU, with a gradient scaler)")
    dtype: str = _setting("float32", "the backbone's weights: float32, bfloat16 or float16 (the adapters "
                          "train in float32)")
    tf32: str = _setting("on", "float32 matmuls on CUDA's TF32 tensor cores: on (several times faster on "
                         "A100/H100, 10-bit mantissa products) or off (full float32); no effect on the CPU")
    gradient_checkpointing: bool = _setting(False, "recompute activations in the backward pass (less "
                                            "memory, ~30 %% slower)")
    load_in_4bit: bool = _setting(False, "QLoRA: the backbone quantised to 4 bits (NF4) by bitsandbytes, "
                                  "where it runs")
    report_to: str = _setting("tensorboard", "experiment tracking through Accelerate: tensorboard (event "
                              "files in the run directory), mlflow, wandb or none")
    eval_batch_size: int = _setting(256, "evaluation batch size (evaluation runs longest first, so a batch "
                                    "pads little)")
    threads: int | None = _setting(None, "torch CPU threads (default: torch's choice)")
    output_dir: str = _setting("runs/train", "run directory (config, metrics, per-matrix statistics, "
                               "adapter)")
    log_every: int = _setting(10, "log loss, learning rate, gradient norm and step time to the trackers, "
                              "refresh the progress bar and check for NaN/inf every this many steps")
    checkpoint_every: int | None = _setting(None, "also save a checkpoint every this many optimizer steps "
                                            "(atomic; the previous one is kept until the new one is "
                                            "whole); default: about every 10 minutes of a run's steps, "
                                            "never on runs under 200 steps; 0 = epoch ends only")
    # the method's own settings as given, by their flat names (fw_beta), defaults filled in: what config files
    # and to_dict carry. Not resolved: a None that depends on other settings stays None (see method_settings).
    method_setting_values: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})
    # the same settings as the method's typed Settings object (built through the registry, checked; fields
    # the run fills, its seed or rank, at their defaults): cfg.method_settings.lambda_fw
    method_settings: Any = field(init=False, compare=False, repr=False, metadata={"internal": True})

    # keys that do not change the result: a run directory may be reused with other values
    NON_IDENTITY = ("output_dir", "data_dir", "threads", "log_every", "eval_batch_size", "checkpoint_every",
                    "label", "report_to", "gradient_checkpointing")
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
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length", "eval_batch_size",
                     "log_every", "train_limit", "eval_limit", "threads", "max_new_tokens"):
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
        stray = sorted(set(self.method_setting_values) - set(owner.defaults()))
        if stray:
            raise UserError(f"{', '.join(stray)}: not settings of method {self.method}")
        self.method_setting_values = {**owner.defaults(), **self.method_setting_values}
        self.method_settings = _build_method_settings(self.method, self.method_setting_values)

    def _check_data(self) -> None:
        own_data_flags = [name for name in ("text_columns", "label_column", "validation", "prompt_column",
                                            "response_column", "messages_column")
                          if getattr(self, name) is not None]
        # the task's name: the data's own when --dataset comes without --task, else as given (a plain str)
        unnamed = isinstance(self.task, _DefaultTask)
        has_data = bool(self.dataset and self.dataset.strip())
        self.task = data_name(self.dataset) if unnamed and has_data else str(self.task)
        if self.dataset is None:
            if own_data_flags:
                flag = own_data_flags[0].replace("_", "-")
                raise UserError(f"--{flag} describes your own data: give --dataset FILE too")
            return
        if not self.dataset.strip():
            raise UserError("--dataset is empty: give a file or a hub dataset name")
        if (self.prompt_column is None) != (self.response_column is None):
            raise UserError("--prompt-column and --response-column go together (instruction data)")
        if self.messages_column and self.prompt_column:
            raise UserError("give --messages-column (chat data) or --prompt-column/--response-column, "
                            "not both")
        if (self.messages_column or self.prompt_column) and (self.text_columns or self.label_column):
            raise UserError("instruction data has a prompt and a response (or messages), "
                            "not text and label columns")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            columns = ",".join(self.text_columns)
            raise UserError(f"--text-columns {columns}: give one column, or two for pairs")

    def budget_percent(self) -> float | None:
        """The adapter budget in % that picks the rank: None when --rank gives it; DEFAULT_BUDGET when
        neither --rank nor --budget is given."""
        if self.rank is not None:
            return None
        return self.budget if self.budget is not None else DEFAULT_BUDGET

    # ---- conversions --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Flat: the shared settings and the method's own, as config files and --flags name them."""
        out = {f.name: getattr(self, f.name) for f in config_fields()}
        out.update(self.method_setting_values)
        return {k: list(v) if isinstance(v, list) else v for k, v in out.items()}

    def identity(self) -> dict[str, Any]:
        """The settings that decide the result (what a run directory must agree on to be resumed)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NON_IDENTITY}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Shared settings, plus method settings: the run's method keeps its own; another method's settings
        (a preset's lambda_fw for a LoRA run) are accepted and left out."""
        shared_types = setting_types(include_methods=False)
        owned = methods.all_settings()
        unknown = sorted(set(values) - set(shared_types) - set(owned))
        if unknown:
            known = sorted(set(shared_types) | set(owned))
            raise UserError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        method_types = _method_setting_types()
        shared = {k: _convert(k, v, source, shared_types[k]) for k, v in values.items() if k in shared_types}
        given = {k: _convert(k, v, source, method_types[k]) for k, v in values.items() if k in owned}
        method = shared.get("method", cls.method)
        # another method's settings are checked too (a bad value is never silently carried), then left out
        for name in {owned[k][0].name for k in given} - {method}:
            _build_method_settings(name, {k: v for k, v in given.items() if owned[k][0].name == name})
        own = {k: v for k, v in given.items() if owned[k][0].name == method}
        return cls(**shared, method_setting_values=own)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def data_name(dataset: str) -> str:
    """The name a user's data goes by in reports: the file's stem, or the hub dataset's last part."""
    path = Path(dataset)
    name = path.stem if path.suffix else dataset.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "data"


def config_fields() -> list[dataclasses.Field]:
    """The shared settings (each method's own come from fwlora.methods.all_settings())."""
    return [f for f in fields(TrainConfig) if not f.metadata.get("internal")]


def setting_types(include_methods: bool = True) -> dict[str, Any]:
    """{setting: its type} (typing objects, e.g. int | None) for the shared settings and, unless told
    otherwise, every registered method's own by its flat name."""
    hints = typing.get_type_hints(TrainConfig)
    out = {f.name: hints[f.name] for f in config_fields()}
    return {**out, **_method_setting_types()} if include_methods else out


def _method_setting_types() -> dict[str, Any]:
    out = {}
    for cls in methods.REGISTRY.values():
        hints = typing.get_type_hints(cls.Settings)
        out.update({cls.flat_name(f.name): hints[f.name] for f in cls.setting_fields()})
    return out


def type_parts(annotation: Any) -> tuple[tuple[Any, ...], bool]:
    """(the types a value may have, whether None is allowed): int | None -> ((int,), True)."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    parts = typing.get_args(annotation) if is_union else (annotation,)
    return tuple(p for p in parts if p is not type(None)), type(None) in parts


_SETTING_ERROR = re.compile(r"^(?:\w+\.)?(\w+) = (.*)$", re.S)


def _build_method_settings(method: str, flat: dict[str, Any]) -> Any:
    """Build a method's Settings from flat settings; its own checks' errors become one UserError that names
    the setting as the command line does (--fw-beta), whatever exception type the method's library uses."""
    cls = methods.get(method)
    try:
        return cls.make_settings(flat)
    except (ValueError, TypeError) as e:  # FWLoRAError and UserError are ValueErrors
        message = str(e)
        found = _SETTING_ERROR.match(message)
        if found and found.group(1) in {f.name for f in cls.setting_fields()}:
            message = f"{cls.flat_name(found.group(1)).replace('_', '-')} = {found.group(2)}"
        raise UserError(message) from None


def _convert(name: str, value: Any, source: str, annotation: Any) -> Any:
    """Check a config-file value against the setting's type (ints may stand for floats; lists from
    strings)."""
    kinds, nullable = type_parts(annotation)
    if value is None:
        if nullable:
            return None
        raise UserError(f"{source}: {name} may not be null")
    if kinds == (int, float):  # a count of steps, or a fraction of the run
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                pass
        if not is_real(value):
            raise UserError(f"{source}: {name} must be a number (steps, or a fraction of the run), "
                            f"got {value!r}")
        return value
    (kind,) = kinds  # a setting has one type besides None (or int | float above)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{source}: {name} must be a list of strings, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if kind is int:
        if not is_int(value):
            raise UserError(f"{source}: {name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not is_real(value):
            raise UserError(f"{source}: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range
            raise UserError(f"{source}: {name} is too large a number") from None
    if kind is str or typing.get_origin(kind) is Literal:  # a Literal's choices: the method's own check
        if not isinstance(value, str):
            raise UserError(f"{source}: {name} must be a string, got {value!r}")
        return value
    raise TypeError(f"setting {name}: no conversion for type {annotation!r}")


class _SettingsLoader(yaml.SafeLoader):
    """YAML with 1.2's booleans: only true and false; yes, no, on and off stay strings (mixed_precision: no)."""


_SettingsLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SettingsLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                      list("tTfF"))


def read_yaml(text: str) -> Any:
    """A settings file's or --set value's YAML: safe, with YAML 1.2's booleans."""
    return yaml.load(text, Loader=_SettingsLoader)


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
        data = json.loads(text) if path.suffix == ".json" else read_yaml(text)
    except (ValueError, RecursionError, yaml.YAMLError) as e:  # ValueError: bad JSON, or a 4300+ digit int
        language = "JSON" if path.suffix == ".json" else "YAML"
        raise UserError(f"config file {path}: not valid {language} ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"config file {path}: expected a mapping of settings, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}
