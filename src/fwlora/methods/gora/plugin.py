"""GoRA as a plug-in: per-matrix ranks from |W * G| under LoRA's budget, B fitted to the gradient through a
random A (allocation.py and init.py hold the math, ../weight_grads.py the gradient pass, ../ranks.py the resize).

Budget parity: the ranks spend at most LoRA's adapter size at the run's rank r (allocation.py: short of it by
less than one rank of one matrix), from the start: GoRA never trains more. Every matrix keeps LoRA's scaling
s = alpha / r (alpha_m = s r_m in the adapter config's alpha_pattern, as the authors' default of scaling by the
reference rank), so a unit of rank learns at LoRA's speed. The adapter saved is a standard PEFT LoRA adapter
(rank_pattern / alpha_pattern). The gradient pass reads the run's first `batches` training batches inside
build(), so its cost is the run's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fwlora.checks import is_int, is_real
from fwlora.errors import MethodError, UserError, bad_setting
from fwlora.files import write_text_atomic
from fwlora.methods.base import Method, lora_config, short_name
from fwlora.methods.gora.allocation import REDUCTIONS, gora_ranks, importance
from fwlora.methods.gora.init import fit_b
from fwlora.methods.gradients import find_lora_layers, same_on_every_process
from fwlora.methods.ranks import refresh_optimizer, resize_lora_ranks
from fwlora.methods.registry import register
from fwlora.methods.weight_grads import NEEDS_WEIGHT_GRADIENTS, base_weight, weight_gradients

STATE_FILE = "gora_state.json"


@dataclass(kw_only=True)
class GoRASettings:
    batches: int = field(default=4, metadata={
        "help": "training batches whose mean full-weight gradient G gives the importances and B0 (read before "
                "step 1, inside the timed run)"})
    gamma: float = field(default=0.05, metadata={
        "help": "step size of the initial update: s B0 A0 = -gamma sqrt(d_in / r_m) G P_A, so E||dW0|| = gamma "
                "||G|| (the paper: 0.05 to 0.08)"})
    min_rank: int | None = field(default=None, metadata={
        "help": "smallest rank of a matrix (default the paper's r / 2, at least 1)"})
    max_rank: int | None = field(default=None, metadata={
        "help": "largest rank of a matrix (default the paper's 4 r)"})
    importance_reduce: Literal["mean", "sum"] = field(default="mean", metadata={
        "help": "a matrix's importance: 'mean' of |W * G| (the paper's) or its 'sum' (larger matrices weigh more)"})

    def __post_init__(self) -> None:
        if not is_int(self.batches) or self.batches < 1:
            raise bad_setting(self, "batches", "must be an integer >= 1")
        if not is_real(self.gamma) or not 0 < self.gamma < float("inf"):
            raise bad_setting(self, "gamma", "must be a finite number > 0")
        for name in ("min_rank", "max_rank"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise bad_setting(self, name, "must be an integer >= 1, or None for the paper's default")
        if self.importance_reduce not in REDUCTIONS:
            raise bad_setting(self, "importance_reduce", "must be one of " + ", ".join(f"'{r}'" for r in REDUCTIONS))

    def bounds(self, rank: int) -> tuple[int, int]:
        """(r_min, r_max) at the run's rank."""
        return (self.min_rank if self.min_rank is not None else max(1, rank // 2),
                self.max_rank if self.max_rank is not None else 4 * rank)


@register
class GoRA(Method):
    name, label = "gora", "GoRA"
    Settings = GoRASettings
    prefix = "gora_"
    search_space = {"gora_gamma": {"type": "categorical", "choices": [0.02, 0.05, 0.08]}}
    colour, line_style = "tab:olive", ("-", "P")
    rank_column, importance_column = "gora_rank", "gora_importance"
    figures = ("ranks",)
    uses_data_pass = True
    refuses_quantized = NEEDS_WEIGHT_GRADIENTS

    def check(self) -> list[str]:
        super().check()
        r_min, r_max = self.settings.bounds(self.run.rank)
        if r_min > self.run.rank:
            raise UserError(f"gora-min-rank = {r_min} > the run's rank {self.run.rank}: the floors alone would spend "
                            "more than LoRA's budget")
        if r_max < self.run.rank:
            raise UserError(f"gora-max-rank = {r_max} < the run's rank {self.run.rank}: LoRA's budget could not be "
                            "spent")
        return []

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        r = self.run.rank
        self.lora_alpha = self.run.lora_alpha or 2.0 * r  # LoRA's default: s = alpha / r = 2
        self.scaling = self.lora_alpha / r
        peft_model = get_peft_model(model, lora_config(self.run, r, self.lora_alpha))
        layers = find_lora_layers(peft_model)
        grads = weight_gradients(peft_model, layers, self.data_pass(), self.settings.batches)
        self.dims = {n: (int(m.in_features), int(m.out_features)) for n, m in layers.items()}
        self.importances = {n: importance(base_weight(m), grads[n], self.settings.importance_reduce)
                            for n, m in layers.items()}
        ranks = gora_ranks(self.importances, self.dims, r, *self.settings.bounds(r))
        self.ranks = same_on_every_process({n: ranks[n] for n in layers}, next(peft_model.parameters()).device)
        resize_lora_ranks(peft_model, self.ranks)  # fresh PEFT A where the rank changed; s kept
        for name, layer in find_lora_layers(peft_model).items():
            adapter = layer.active_adapters[0]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            with torch.no_grad():
                b.copy_(fit_b(grads.pop(name), a.detach(), self.settings.gamma, self.scaling).to(b.dtype))
        self.budget = r * sum(d_in + d_out for d_in, d_out in self.dims.values())
        return peft_model

    def refresh_optimizer(self, optimizer: Any) -> None:
        refresh_optimizer(optimizer, self.model)

    def save_state(self, directory: Path) -> None:
        write_text_atomic(Path(directory) / STATE_FILE, json.dumps({"ranks": self.ranks, "importances": self.importances}))

    def load_state(self, directory: Path) -> bool:
        """Take the saved ranks (a resumed run's gradient pass could differ in the last bit); True if that
        changed a shape."""
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise MethodError(f"no GoRA state at {path}")
        state = json.loads(path.read_text(encoding="utf-8"))
        ranks = {n: int(r) for n, r in state["ranks"].items()}
        self.importances = {n: float(v) for n, v in state["importances"].items()}
        if ranks == self.ranks:
            return False
        if set(ranks) != set(self.ranks):
            raise MethodError("saved GoRA state belongs to a model with other adapted layers")
        self.ranks = ranks
        resize_lora_ranks(self.model, ranks)
        return True

    save_adapter_extras = save_state

    def log_values(self, step: int) -> dict[str, float]:
        return {f"rank/{short_name(n)}": float(r) for n, r in self.ranks.items()} if step == 0 else {}

    def params(self) -> int:
        return sum(self.ranks[n] * (d_in + d_out) for n, (d_in, d_out) in self.dims.items())

    def summary(self) -> dict[str, Any]:
        s = self.settings
        r_min, r_max = s.bounds(self.run.rank)
        return {"lora_alpha": self.lora_alpha, "scaling": self.scaling, "batches": s.batches, "gamma": s.gamma,
                "min_rank": r_min, "max_rank": r_max, "importance_reduce": s.importance_reduce,
                "budget_params": self.budget, "params": self.params(), "final_total_rank": sum(self.ranks.values()),
                "ranks": {short_name(n): r for n, r in self.ranks.items()}}

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        total = sum(self.importances.values()) or 1.0
        return {"gora_rank": {short_name(n): r for n, r in self.ranks.items()},
                "gora_importance": {short_name(n): v / total for n, v in self.importances.items()}}
