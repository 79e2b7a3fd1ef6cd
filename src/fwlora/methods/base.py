"""The interface every method implements, in the spirit of PEFT's tuners: a settings dataclass plus the
code that applies it. The training loop (fwlora.train) only ever calls these hooks, in this order:

    method = MethodClass(settings, run)         # settings validated where built
    notes = method.check()                      # before anything is built: refuse or warn (UserError)
    method.data = DataPass(...)                 # only where uses_data_pass: training batches to read in build
    peft_model = method.build(model)            # the PEFT model for the run's budget (timed, on the training
                                                # device, where uses_data_pass or timed_init: an initialisation's
                                                # reading and SVDs are its cost)
    optimizer = method.make_optimizer(model, lr, weight_decay, ...) or AdamW   # LoRA+'s parameter groups
    method.attach(unwrapped_peft_model)         # after Accelerate has prepared it (hooks, state on device)
    per micro-batch:   loss = task_loss + method.extra_loss()      (None: no extra term)
    per optimizer step, after the last backward:
        clip -> method.before_optimizer_step(step, grad_scale) -> optimizer.step()
             -> changed = method.after_optimizer_step(step) -> (changed: method.refresh_optimizer(optimizer))
             -> scheduler.step() -> zero_grad -> method.log_values(step) to the trackers
    checkpoint:  method.save_state(dir) / method.load_state(dir)   (load before the trainable weights)
    end:         method.delta_weights(dW); method.summary(); method.matrix_columns();
                 method.save_adapter_extras(adapter_dir); close()

`step` is the 0-based index of the optimizer step being closed. A method that changes the set or the
shapes of trainable parameters returns True from after_optimizer_step (and from load_state): the loop
then calls its refresh_optimizer, which carries optimizer state for the parameters still present.

Presentation: the class attributes below `label` (colour, role, time hypothesis, rank and importance columns,
figures, report_info) answer every per-method question the report and the sweep ask; nothing outside
methods/ names a method.

Settings: the fields of `Settings` (a dataclass, help text in field metadata, checks in __post_init__)
become training settings named `flat_name(field)`: `prefix + field` unless `flat_names` says otherwise.
Fields listed in `run_fields` are filled from the run (its seed, its rank), not by the user.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from fwlora.errors import MethodError, UserError
from fwlora.records import RunRecord


def short_name(name: str) -> str:
    """A module's name without PEFT's wrapper prefix (base_model.model.bert.encoder... -> bert.encoder...): how
    result.json's matrix table and the trackers name a matrix."""
    return name.removeprefix("base_model.model.")


@dataclass(frozen=True)
class RunInfo:
    """What a method may know of the run it is part of."""

    total_steps: int  # optimizer steps of the whole run
    seed: int
    rank: int  # the budget's LoRA rank (LoRA's r; AdaLoRA's target_r)
    adapter_params: int  # LoRA's adapter size at that rank: the parameter budget
    targets: list[str]  # target-module suffixes
    modules_to_save: list[str]  # the task head, trained in full by every method
    lora_alpha: float | None  # the user's --lora-alpha, None for the method's default
    lora_dropout: float
    task_type: str | None = None  # PEFT task type ("SEQ_CLS", "CAUSAL_LM") or None for a custom head
    quantized: bool = False  # the backbone is 4-bit (QLoRA's --load-in-4bit)


@dataclass(frozen=True)
class DataPass:
    """Training data a method may read while it builds its adapter (a gradient- or activation-driven
    initialisation: LoRA-GA, EVA, GoRA, LoRA-One). `batches(n)` yields the run's first n training batches (the
    loop's own batch size, on the model's device, in the run's seeded order); `loss(model, batch)` is the
    task's training loss of one batch for any model of the run (the base model or the PEFT model)."""

    batches: Callable[[int], Iterator[dict[str, torch.Tensor]]]
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class NoSettings:
    """A method without settings of its own."""


@dataclass(frozen=True)
class TimeHypothesis:
    """What a method claims of its training time, as a ratio to the reference column's (LoRA's).

    `limit`: the claim is "within": met if the measured ratio is at most the limit. `tolerance`: the claim
    is "about": close to it if |measured - ratio| <= tolerance, else faster or slower than that.
    """

    ratio: float
    limit: float | None = None
    tolerance: float | None = None
    source: str = ""

    def verdict(self, measured: float | None, reference: str = "the reference") -> str:
        if measured is None:
            return f"no pairs with {reference}"
        if self.limit is not None:
            return "met" if measured <= self.limit else "not met"
        if self.tolerance is not None and abs(measured - self.ratio) <= self.tolerance:
            return "close to it"
        return "faster than that" if measured < self.ratio else "slower than that"

    def describe(self) -> str:
        """'~1.01x, met if <= 1.02x' or '~1.12x'."""
        return f"~{self.ratio:g}x" + (f", met if <= {self.limit:g}x" if self.limit is not None else "")


# docs/method.md's claim for a Fisher-guided method: time within ~1 % of plain LoRA ("~" read as at most 1.02x:
# one point for the "~" and for timing noise)
WITHIN_LORA_TIME = TimeHypothesis(1.01, limit=1.02, source="docs/method.md: within ~1 % of LoRA")

# How the experiment system shows methods (the report and the sweep ask the registry, never a name):
REFERENCE, RIVAL = "reference", "rival"
FIGURES = ("importance", "ranks", "penalty_question")


def first_column(method_of: Mapping[str, str], method: str) -> str | None:
    """The report column of a method's own runs (the column named after it), else its first variant's."""
    if method_of.get(method) == method:
        return method
    return next((label for label, m in method_of.items() if m == method), None)


@dataclass(frozen=True)
class ReportCell:
    """One (task, budget) of a report, as a method's own report section reads it."""

    task: str
    budget_label: str
    runs: Mapping[str, Mapping[int, RunRecord]]  # column label -> seed -> the complete run's record


@dataclass(frozen=True)
class ReportView:
    """What a method's own report section may read: the protocol's columns in the report's order (a column is
    a method or a bench's named variant of one), how the report prints them, and every cell's complete runs."""

    labels: tuple[str, ...]
    names: Mapping[str, str]
    method_of: Mapping[str, str]
    reference: str  # the column every other is compared with
    cells: tuple[ReportCell, ...]

    def column_of(self, method: str) -> str | None:
        return first_column(self.method_of, method)


class Method:
    """Base class: plain behaviour (no extra loss, nothing per step, no state). Subclasses override."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how reports print it
    # ---- how the report shows it (every per-method question the report and the sweep ask) ----
    colour: ClassVar[str | None] = None  # matplotlib colour of its lines and bars; None: the next of a palette
    line_style: ClassVar[tuple[str, str] | None] = None  # (line style, marker); None: the next of a list
    # "reference": the default column every other is compared with and timed against (LoRA); "rival": every
    # column is compared with it too, and its verdict lines name it (AdaLoRA); None: neither
    role: ClassVar[str | None] = None
    # its claim on time; by default docs/method.md's for any method: within ~1 % of LoRA's (None: ratios, no verdict)
    time_hypothesis: ClassVar[TimeHypothesis | None] = WITHIN_LORA_TIME
    # the library a user would take it from instead of this one ("peft"): the report's "best shipped method"
    ships_with: ClassVar[str | None] = None
    rank_column: ClassVar[str | None] = None  # the per-matrix column (matrix_columns) holding its final ranks
    rank_unit: ClassVar[str] = "rank"  # what one unit of that rank is ("kept singular values")
    importance_column: ClassVar[str | None] = None  # a per-matrix column of importance scores that sum to 1
    # extra figures and tables: "importance" (a heatmap of its importance column), "ranks" (its final ranks
    # beside the rival's and the importance), "penalty_question" (does its penalty reallocate or decay evenly?)
    figures: ClassVar[tuple[str, ...]] = ()
    report_info: ClassVar[tuple[str, ...]] = ()  # method_info keys shown as its settings (else its own settings)
    report_info_note: ClassVar[str] = "values over all budgets"  # how the report heads those resolved values
    warmup_phase: ClassVar[str] = "its warm-up"  # how verdict lines name its warm-up steps
    Settings: ClassVar[type] = NoSettings
    prefix: ClassVar[str] = ""
    flat_names: ClassVar[dict[str, str]] = {}
    run_fields: ClassVar[tuple[str, ...]] = ()
    # the sweep's default search space for this method's own settings (flat name -> sweep entry)
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}
    uses_data_pass: ClassVar[bool] = False  # True: the loop sets self.data (a DataPass) before build()
    # True: build() does work of its own on the weights (an SVD of each, a data pass): the loop runs it on the
    # training device and counts its seconds as training time (timing.init_seconds). uses_data_pass implies it.
    timed_init: ClassVar[bool] = False
    # why this method cannot train on a 4-bit backbone (None: it can); check() refuses such a run in one line
    refuses_quantized: ClassVar[str | None] = None

    def __init__(self, settings: Any, run: RunInfo):
        self.settings = settings
        self.run = run
        self.model: nn.Module | None = None
        self.data: DataPass | None = None

    def data_pass(self) -> DataPass:
        """The training batches a uses_data_pass method reads in build(); its one error where the loop set none."""
        if self.data is None:
            raise MethodError(f"{self.label or self.name} reads training batches when it builds its adapter: "
                              "set method.data (a DataPass) before build()")
        return self.data

    # ---- settings ----------------------------------------------------------------------------------

    @classmethod
    def setting_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls.Settings) if f.name not in cls.run_fields]

    @classmethod
    def flat_name(cls, field_name: str) -> str:
        return cls.flat_names.get(field_name, cls.prefix + field_name)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """{flat name: default} of the user-facing settings."""
        out = {}
        for f in cls.setting_fields():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[cls.flat_name(f.name)] = default
        return out

    @classmethod
    def make_settings(cls, flat: dict[str, Any], run: RunInfo | None = None) -> Any:
        """Build (and so validate) the settings from flat training settings; run fields from the run."""
        values = {f.name: flat[cls.flat_name(f.name)] for f in cls.setting_fields() if cls.flat_name(f.name) in flat}
        if run is not None:
            values.update(cls.run_values(run))
        return cls.Settings(**values)

    @classmethod
    def run_values(cls, run: RunInfo) -> dict[str, Any]:
        """Values of the run_fields (default: a `seed` field gets the run's seed)."""
        return {"seed": run.seed} if "seed" in cls.run_fields else {}

    @classmethod
    def report_section(cls, view: ReportView) -> str | None:
        """Markdown of this method's own part of a report: a question about it that the generic tables do not
        ask (a heading and what answers it), or None. Called for every registered method, present or not."""
        return None

    # ---- the hooks the loop calls ---------------------------------------------------------------------

    def check(self) -> list[str]:
        """Refuse settings that cannot work for this run (raise UserError), or return notes to record. An
        override calls super().check() first: the refusal of a 4-bit backbone lives here."""
        if self.run.quantized and self.refuses_quantized:
            raise UserError(f"--method {self.name} with --load-in-4bit: {self.refuses_quantized}; "
                            "train it on a float backbone (--dtype bfloat16 saves memory)")
        return []

    def build(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def make_optimizer(self, model: nn.Module, lr: float, weight_decay: float,
                       **options: Any) -> torch.optim.Optimizer | None:
        """The method's own AdamW over the model's trainable parameters (LoRA+'s groups), with the loop's other
        AdamW keywords (`options`: fused); None: the loop's AdamW. The schedule scales every group's lr alike."""
        return None

    def attach(self, model: nn.Module) -> None:
        """Called once with the (unwrapped) PEFT model the loop trains, on its device."""
        self.model = model

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def before_optimizer_step(self, step: int, grad_scale: float | torch.Tensor | None) -> None:
        """grad_scale: under fp16, the GradScaler's scale of this step's backward pass (what backward hooks saw
        carries it; .grad is already unscaled), and a non-finite gradient is an overflow the scaler skips:
        leave it out of any statistic. None without a scaler (a non-finite gradient is divergence)."""

    def after_optimizer_step(self, step: int) -> bool:
        return False

    def refresh_optimizer(self, optimizer: Any) -> None:
        """Point the optimizer at the model's trainable parameters after after_optimizer_step (or load_state)
        returned True, keeping the state of every parameter still present. Only methods that change shapes."""
        raise NotImplementedError(f"method {self.name!r} changed its trainable parameters but does not say how the "
                                  "optimizer follows: implement refresh_optimizer (fwrank's resize.refresh_optimizer)")

    def log_values(self, step: int) -> dict[str, float]:
        """Values to log to the trackers after optimizer step `step` (0-based), e.g. importances at the warm-up's end."""
        return {}

    def warmup_steps(self) -> int | None:
        """Optimizer steps that cost more than a plain step (a measuring warm-up), for the timing split."""
        return None

    def save_state(self, directory: Path) -> None:
        pass

    def load_state(self, directory: Path) -> bool:
        """Restore the state saved by save_state; True when the trainable parameters changed shape."""
        return False

    def save_adapter_extras(self, directory: Path) -> None:
        """Anything to keep next to the saved PEFT adapter."""

    @classmethod
    def continued_state(cls, model: nn.Module, adapter_dir: Path) -> Any:
        """What training this saved adapter further needs of the method, rebuilt on the loaded PEFT model from
        what save_adapter_extras kept (FW-LoRA's importances and penalty); None where the adapter alone is it."""
        return None

    def summary(self) -> dict[str, Any]:
        """What the method adds to result.json under method_info (resolved settings, final ranks, ...)."""
        return {}

    def delta_weights(self, deltas: dict[str, Any]) -> dict[str, Any]:
        """dW per matrix as the update training made, from the adapter's own (models.delta_weights, by short module
        name: s B A as a fwlora.lowrank.LowRank, or dense): a method whose adapter does not start at zero (PiSSA)
        or whose update is not s B A (DoRA) corrects it here; the matrix table is computed from what this returns."""
        return deltas

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        """Per-matrix values for result.json's matrix table: {column: {module name: value}}."""
        return {}

    def close(self) -> None:
        """Detach hooks; the model stays as it is."""


def lora_config(run: RunInfo, rank: int, lora_alpha: float, **extra: Any) -> Any:
    """PEFT's LoraConfig on the run's targets, the head trained in full."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(run.targets), lora_dropout=run.lora_dropout,
                      modules_to_save=list(run.modules_to_save) or None, task_type=run.task_type, **extra)


def with_help(default: Any, help: str) -> Any:
    """A dataclass field with its help text (shown by --help and in the README)."""
    return field(default=default, metadata={"help": help})
