"""AdaLoRA, PEFT's implementation, configured as its authors' GLUE scripts and scaled to the run.

Budget parity with LoRA rank r: target_r = r (the final average rank), init_r = ceil(1.5 r) (the AdaLoRA
paper). PEFT's contract, honoured by the loop's hooks: `update_and_allocate(step)` once per optimizer
step, after optimizer.step() and before zero_grad; `total_step` counts optimizer steps.

The orthogonal regulariser: PEFT adds it in AdaLoraModel.forward when the model computes a loss. The task
wrappers (PeftModelForSequenceClassification, ...ForCausalLM) call that forward; the generic PeftModel, which
a model with its own head and no PEFT task type gets (every classifier here), calls the base model directly
and skips it, which silently trains AdaLoRA without its regulariser while its weight (0.1) is recorded
(CHANGELOG: such runs equal AdaLoRA with the weight set to 0 on every seed). So `extra_loss` adds it wherever
the wrapper skips it, with PEFT's formula: weight x mean over A and B matrices of ||P P^T - I||_F (A) / ||P^T P - I||_F (B).

Checkpoints: PEFT has no public API for the rank allocator's state (the sensitivity EMAs `ipt`,
`exp_avg_ipt`, `exp_avg_unc` of `model.base_model.rankallocator`) nor for restoring the masks it wrote
into `peft_config.rank_pattern`; `save_state` / `load_state` below are the one place that reads and
writes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fwlora.errors import UserError
from fwlora.files import read_json, write_json
from fwlora.methods.base import RIVAL, Method, TimeHypothesis, short_name, with_help
from fwlora.methods.registry import register


def default_alpha(init_r: int) -> float:
    """AdaLoRA scales its update by alpha / init_r; its authors' GLUE scripts use alpha 32 with init_r 8 on
    CoLA (a scaling of 4). We keep that scaling: alpha = 4 init_r."""
    return 4.0 * init_r


def adalora_ranks(rank: int) -> tuple[int, int]:
    """(init_r, target_r) for budget parity with LoRA rank r: AdaLoRA ends at an average rank r and
    starts at ceil(1.5 r), as in the AdaLoRA paper."""
    return math.ceil(1.5 * rank), rank


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


@dataclass
class AdaLoRASettings:
    alpha: float | None = with_help(None, "AdaLoRA alpha (its update is scaled by alpha / init_r; default 4 init_r, see docs/decisions.md)")
    orth_reg: float = with_help(0.1, "AdaLoRA orthogonal regulariser weight (authors' GLUE scripts: 0.1)")
    tinit: float = with_help(0.12, "AdaLoRA initial phase without pruning, fraction of steps")
    tfinal: float = with_help(0.48, "AdaLoRA final phase at the target budget, fraction of steps")
    delta: float = with_help(0.0015, "AdaLoRA: one budget allocation every this fraction of steps (>= 1 step)")
    beta1: float = with_help(0.85, "AdaLoRA sensitivity EMA")
    beta2: float = with_help(0.85, "AdaLoRA uncertainty EMA")
    init_r: int | None = with_help(None, "AdaLoRA's starting rank per matrix (default ceil(1.5 r), the paper's; "
                                   "= r trains no extra capacity, and then no rank can move: the budget is every triplet)")

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> UserError:
            return UserError(f"adalora-{name.replace('_', '-')} = {getattr(self, name)!r}: {why}")

        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise bad("alpha", "must be a positive number")
        if not (math.isfinite(self.orth_reg) and self.orth_reg >= 0):
            raise bad("orth_reg", "must be a finite number >= 0")
        for name in ("tinit", "tfinal", "delta"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, "must be a fraction in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise bad(name, "must lie strictly between 0 and 1")
        if self.init_r is not None and (isinstance(self.init_r, bool) or not isinstance(self.init_r, int) or self.init_r < 1):
            raise bad("init_r", "must be an integer >= 1 (and >= the run's rank)")


# what the report shows of an AdaLoRA run: its resolved schedule (method_info), not the fractions it was given
SCHEDULE_INFO = ("init_r", "target_r", "lora_alpha", "total_step", "tinit", "tfinal", "deltaT", "orth_reg_weight",
                 "beta1", "beta2")


@register
class AdaLoRA(Method):
    name, label = "adalora", "AdaLoRA"
    ships_with = "peft"
    Settings = AdaLoRASettings
    prefix = "adalora_"
    colour, line_style, role = "tab:orange", ("--", "s"), RIVAL
    # docs/method.md: AdaLoRA costs about 10-20 % more than LoRA
    time_hypothesis = TimeHypothesis(1.12, tolerance=0.05, source="docs/method.md: AdaLoRA ~1.12x LoRA")
    rank_column, rank_unit = "adalora_rank", "kept singular values"
    report_info, report_info_note = SCHEDULE_INFO, "PEFT; values over all budgets"

    def check(self) -> list[str]:
        super().check()
        s = self.settings
        self.schedule = AdaLoraSchedule.scaled(self.run.total_steps, s.tinit, s.tfinal, s.delta)
        if s.init_r is not None and s.init_r < self.run.rank:
            raise UserError(f"adalora-init-r = {s.init_r} < the run's rank {self.run.rank}: AdaLoRA prunes from init_r "
                            "down to target_r = rank, so it must start at least there")
        return []

    def build(self, model: nn.Module) -> nn.Module:
        from peft import AdaLoraConfig, get_peft_model

        s = self.settings
        self.init_r, self.target_r = adalora_ranks(self.run.rank)
        if s.init_r is not None:
            self.init_r = s.init_r
        self.lora_alpha = s.alpha or default_alpha(self.init_r)
        sch = self.schedule
        config = AdaLoraConfig(init_r=self.init_r, target_r=self.target_r, total_step=sch.total_step, tinit=sch.tinit,
                               tfinal=sch.tfinal, deltaT=sch.deltaT, beta1=s.beta1, beta2=s.beta2,
                               orth_reg_weight=s.orth_reg, target_modules=list(self.run.targets),
                               lora_alpha=self.lora_alpha, lora_dropout=self.run.lora_dropout,
                               modules_to_save=list(self.run.modules_to_save) or None, task_type=self.run.task_type)
        return get_peft_model(model, config)

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        from peft import PeftModel

        # a wrapper whose forward is the generic PeftModel's never reaches AdaLoraModel.forward (see above)
        self.regulariser_here = type(model).forward is PeftModel.forward and self.settings.orth_reg > 0
        adapter = next(iter(model.peft_config))
        self._factors = [(p, "lora_A" in n) for n, p in model.named_parameters()
                         if ("lora_A" in n or "lora_B" in n) and adapter in n]

    def extra_loss(self) -> torch.Tensor | None:
        if not self.regulariser_here or not self.model.training:
            return None
        return self.settings.orth_reg * orthogonal_regulariser(self._factors)

    def before_optimizer_step(self, step: int, grad_scale: float | torch.Tensor | None) -> None:
        self._scaled = grad_scale is not None  # fp16: a non-finite gradient is a step the GradScaler skips

    def after_optimizer_step(self, step: int) -> bool:
        # after optimizer.step(), before zero_grad, with the 0-based step index (PEFT's contract)
        if self.init_r == self.target_r:
            # the budget is every triplet: nothing can be masked (PEFT's kthvalue would be asked for k = 0)
            return False
        if getattr(self, "_scaled", False) and not _finite_gradients(self.model):
            # an overflow the scaler skipped: the budget schedule goes on, the importance leaves the inf out
            allocator = self.model.base_model.rankallocator
            allocator.update_ipt = lambda model: None
            try:
                self.model.base_model.update_and_allocate(step)
            finally:
                del allocator.update_ipt
            return False
        self.model.base_model.update_and_allocate(step)
        return False

    # ---- state (see the module docstring) ----

    def _config(self) -> Any:
        return next(iter(self.model.peft_config.values()))

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        allocator = self.model.base_model.rankallocator
        tensors = {f"{kind}/{n}": t.detach().cpu().contiguous()
                   for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc") for n, t in getattr(allocator, kind).items()}
        if tensors:
            save_file(tensors, str(directory / "adalora_allocator.safetensors"))
        write_json(directory / "adalora_rank_pattern.json", self._config().rank_pattern)

    def load_state(self, directory: Path) -> bool:
        from safetensors.torch import load_file

        allocator = self.model.base_model.rankallocator
        device = next(p.device for p in self.model.parameters())
        path = directory / "adalora_allocator.safetensors"
        for key, value in (load_file(str(path)) if path.is_file() else {}).items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = value.to(device)
        self._config().rank_pattern = read_json(directory / "adalora_rank_pattern.json")
        return False

    # ---- read-outs ----

    def final_ranks(self) -> dict[str, int]:
        """AdaLoRA's final rank per matrix (count of kept singular values), by module name."""
        pattern = getattr(self._config(), "rank_pattern", None) or {}
        return {short_name(k.split(".lora_E")[0]): int(sum(bool(v) for v in mask)) for k, mask in pattern.items()}

    def summary(self) -> dict[str, Any]:
        ranks = self.final_ranks()
        sch, s = self.schedule, self.settings
        return {"init_r": self.init_r, "target_r": self.target_r, "lora_alpha": self.lora_alpha,
                "total_step": sch.total_step, "tinit": sch.tinit, "tfinal": sch.tfinal, "deltaT": sch.deltaT,
                "orth_reg_weight": s.orth_reg, "beta1": s.beta1, "beta2": s.beta2,
                "final_total_rank": sum(ranks.values()) if ranks else None}

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        return {"adalora_rank": self.final_ranks()}


def orthogonal_regulariser(factors: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    """PEFT's AdaLoRA regulariser (AdaLoraModel.forward): the mean over the A (r x d_in) and B (d_out x r)
    factors of ||A A^T - I||_F and ||B^T B - I||_F. factors: (parameter, whether it is an A).

    Batched: each factor as rows X (A, or B^T: both r x d), stacked by shape, so a model's 144 factors are a
    few bmm calls rather than 144 small products (one stack copies the adapters, small next to the model)."""
    groups: dict[tuple[torch.Size, torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p, is_a in factors:
        x = p if is_a else p.T
        groups.setdefault((x.shape, x.dtype, x.device), []).append(x)
    if not groups:
        return torch.zeros(())
    norms = []
    for (shape, dtype, device), xs in groups.items():
        x = torch.stack(xs)  # (n, r, d)
        cov = torch.bmm(x, x.transpose(1, 2))  # (n, r, r)
        norms.append(torch.linalg.matrix_norm(cov - torch.eye(shape[0], dtype=cov.dtype, device=device)))
    return torch.cat(norms).mean()


def _finite_gradients(model: nn.Module) -> bool:
    """Whether every adapter gradient (what PEFT's importance reads) is finite (one host sync)."""
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    return not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
