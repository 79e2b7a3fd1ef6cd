"""fwrank: Fisher-guided rank allocation for PEFT LoRA, measured during a warm-up, applied once.

Train plain LoRA for K optimizer steps while FW-LoRA's hooks (method.py) see every adapted layer's input x
and output gradient g, then give each matrix m a rank r_m under a hard budget and resize the live model once:

    sum_m r_m (d_in + d_out) <= budget = r * sum_m (d_in + d_out)      (LoRA's adapter size at rank r)
    r_min <= r_m <= r_max                    (r_min = 0, the default: a matrix may lose its adapter)

The statistic, per layer, is an EMA of the second moment of G = dL/dW = sum_tokens g x^T on its smaller
side (k = min(d_in, d_out)), k x k:

    d_out <= d_in:  M <- beta M + (1 - beta) Y^T Y / p,  Y = (G Omega)^T  = (x Omega)^T g    (p x d_out)
    d_in  <  d_out: M <- beta M + (1 - beta) Z^T Z / p,  Z = Omega'^T G   = (g Omega')^T x   (p x d_in)

with Omega a fresh Gaussian d_in x p (Omega' d_out x p) matrix per step: E[Y^T Y] / p = G G^T (and
E[Z^T Z] / p = G^T G). sketch_size = 0 keeps G itself (exact mode, for tests). The eigenvalues of M at step K
are the gains lambda_{m,k} (the sigma_k^2 of the gradient), and trace M is an unbiased estimate of FW-LoRA's
F_m = EMA ||G_m||_F^2. Rules: "spectrum" grants ranks one at a time by lambda_{m,k} / (d_in + d_out), best
first (EVA's water-filling, on gradients); "proportional" makes r_m proportional to F_m (FIM-LoRA's control);
"update" runs the same greedy on sigma_k^2 of what the warm-up learned, dW = s B A, capped at the warm-up rank
(magnitude pruning at step K: the control that asks whether the gradient's signal, or any reallocation, helps).

The resize keeps s' = s for each matrix (alpha_m = s r_m, or s sqrt(r_m) with rsLoRA) and sets the adapter to
the best rank-r_m approximation of dW = s B A: B' = U_r S_r^1/2 / s^1/2, A' = S_r^1/2 V_r^T / s^1/2. Depends
on torch, peft and fwlora.method only.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fwlora.method import (DEFAULT_MEASURE_EVERY, FWLoRAError, GradientHooks, NonFiniteFisherError,
                           _average_over_processes, _is_int, _is_real, _single_active_adapter, find_lora_layers)

RANK_STATE_FILE = "fwrank_state.safetensors"


@dataclass
class FWRankConfig:
    """Settings of Fisher-guided rank allocation."""

    target_rank: int | None = field(default=None, metadata={
        "help": "r: the run's LoRA rank; the budget is r * sum_m (d_in + d_out). None: the adapter config's r"})
    warmup_steps: int | float = field(default=500, metadata={
        "help": "K: optimizer steps measured before the resize; a number in (0, 1) is a fraction of the run's steps"})
    beta: float = field(default=0.98, metadata={"help": "EMA factor of the gradient second moment, in (0, 1)"})
    rule: Literal["spectrum", "proportional", "update", "uniform"] = field(default="spectrum", metadata={
        "help": "'spectrum': greedy on the gradient's eigenvalues / (d_in + d_out); 'proportional': r_m proportional "
                "to F_m; 'update': the same greedy on sigma_k^2 of the learned dW = s B A (at most the warm-up rank); "
                "'uniform': every matrix at the target rank (the truncated SVD of dW: capacity without allocation)"})
    r_max: int = field(default=8, metadata={"help": "largest rank any one matrix may get"})
    r_min: int = field(default=0, metadata={
        "help": "smallest rank every matrix keeps, charged to the budget first; 0 lets the rule drop a matrix"})
    sketch_size: int = field(default=8, metadata={
        "help": "p: columns of the Gaussian sketch; 0 keeps the exact gradient (d_out x d_in per layer)"})
    measure_every: int | None = field(default=None, metadata={
        "help": "measure one warm-up step in this many (the EMA then decays by beta^k); default min(8, warmup_steps), "
                "which keeps the warm-up at LoRA's cost (README)"})
    seed: int = field(default=0, metadata={"help": "seed of the sketch matrices"})

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> FWLoRAError:
            return FWLoRAError(f"FWRankConfig.{name} = {getattr(self, name)!r}: {why}")

        if self.target_rank is not None and (not _is_int(self.target_rank) or self.target_rank < 1):
            raise bad("target_rank", "must be an integer >= 1, or None for the adapter's r")
        fraction = _is_fraction(self.warmup_steps)
        if not fraction and (not _is_int(self.warmup_steps) or self.warmup_steps < 1):
            raise bad("warmup_steps", "must be an integer >= 1, or a fraction of the run in (0, 1)")
        if not _is_real(self.beta) or not 0.0 < self.beta < 1.0:
            raise bad("beta", "must lie strictly between 0 and 1")
        if self.rule not in ("spectrum", "proportional", "update", "uniform"):
            raise bad("rule", "must be 'spectrum', 'proportional', 'update' or 'uniform'")
        if not _is_int(self.r_max) or self.r_max < 1:
            raise bad("r_max", "must be an integer >= 1")
        if not _is_int(self.r_min) or not 0 <= self.r_min <= self.r_max:
            raise bad("r_min", f"must be an integer in [0, r_max = {self.r_max}]")
        if self.target_rank is not None and self.r_min > self.target_rank:
            raise bad("r_min", f"must be <= target_rank = {self.target_rank}, or the floor alone would exceed the budget")
        if self.target_rank is not None and self.r_max < self.target_rank:
            raise bad("r_max", f"must be >= target_rank = {self.target_rank}, or the budget could never be spent")
        if self.measure_every is None and not fraction:
            self.measure_every = min(DEFAULT_MEASURE_EVERY, self.warmup_steps)
        if self.measure_every is not None and (not _is_int(self.measure_every) or self.measure_every < 1 or (
                not fraction and self.measure_every > self.warmup_steps)):
            raise bad("measure_every", f"must be an integer in [1, warmup_steps={self.warmup_steps}]")
        if not _is_int(self.sketch_size) or self.sketch_size < 0:
            raise bad("sketch_size", "must be an integer >= 0 (0: exact)")
        if not _is_int(self.seed):
            raise bad("seed", "must be an integer")


    def resolve(self, total_steps: int | None) -> "FWRankConfig":
        """This config with K in optimizer steps: a fraction of the run becomes round(fraction * total_steps)."""
        if not _is_fraction(self.warmup_steps):
            return self
        if total_steps is None:
            raise FWLoRAError(f"FWRankConfig.warmup_steps = {self.warmup_steps} is a fraction of the run: pass "
                              "total_steps= (the run's optimizer steps) so that K can be counted")
        return replace(self, warmup_steps=max(1, round(self.warmup_steps * total_steps)))


def _is_fraction(value: Any) -> bool:
    return isinstance(value, float) and 0.0 < value < 1.0


# ---- allocation rules: pure, deterministic, independent of the input dicts' order ----------------------

def _caps(names: Sequence[str], r_max: int | Mapping[str, int]) -> dict[str, int]:
    return {n: int(r_max[n] if isinstance(r_max, Mapping) else r_max) for n in names}


def _floor(names: Sequence[str], cap: Mapping[str, int], cost: Mapping[str, int], budget: int,
           r_min: int) -> tuple[dict[str, int], int]:
    """Every matrix's rank floor min(r_min, cap) and the budget left after it."""
    floor = {n: min(int(r_min), cap[n]) for n in names}
    left = budget - sum(floor[n] * cost[n] for n in names)
    if left < 0:
        raise FWLoRAError(f"r_min = {r_min} on every matrix costs more than the budget {budget}")
    return floor, left


def allocate_proportional(fisher: Mapping[str, float], cost: Mapping[str, int], budget: int,
                          r_max: int | Mapping[str, int], r_min: int = 0) -> dict[str, int]:
    """r_m = t F_m with sum r_m cost_m = budget (ranks above r_max capped and the rest re-solved), then floors
    plus largest remainders (ties by name) while they fit. A matrix with F_m = 0 gets rank 0. With r_min,
    every matrix first gets its floor and the rest of the budget is shared out so above it."""
    names = sorted(fisher)
    cap = _caps(names, r_max)
    if r_min:
        floor, left = _floor(names, cap, cost, budget, r_min)
        extra = allocate_proportional(fisher, cost, left, {n: cap[n] - floor[n] for n in names})
        return {n: floor[n] + extra[n] for n in names}
    active = [n for n in names if fisher[n] > 0 and cap[n] > 0]
    capped: set[str] = set()
    t = 0.0
    while True:
        free = [n for n in active if n not in capped]
        left = budget - sum(cap[n] * cost[n] for n in capped)
        denom = sum(fisher[n] * cost[n] for n in free)
        if not free or denom <= 0:
            break
        t = left / denom
        newly = {n for n in free if t * fisher[n] >= cap[n]}
        if not newly:
            break
        capped |= newly
    ideal = {n: float(cap[n]) if n in capped else (t * fisher[n] if n in active else 0.0) for n in names}
    ranks = {n: min(cap[n], math.floor(ideal[n])) for n in names}
    left = budget - sum(ranks[n] * cost[n] for n in names)
    for n in sorted(active, key=lambda n: (-(ideal[n] - ranks[n]), n)):
        if ranks[n] < cap[n] and cost[n] <= left:
            ranks[n] += 1
            left -= cost[n]
    return ranks


def allocate_spectrum(gains: Mapping[str, Sequence[float]], cost: Mapping[str, int], budget: int,
                      r_max: int | Mapping[str, int], r_min: int = 0) -> dict[str, int]:
    """Grant ranks one at a time in order of lambda_{m,k} / cost_m (ties: name, then k), skipping a grant that
    no longer fits the budget or r_max, until nothing fits. Negative gains (round-off) count as 0. With
    r_min, every matrix starts at that floor (its first r_min eigenvalues taken) and the greedy goes on."""
    names = sorted(gains)
    cap = _caps(names, r_max)
    ranks, left = _floor(names, cap, cost, budget, r_min)
    order = []
    for n in names:
        lam = sorted((max(float(v), 0.0) for v in gains[n]), reverse=True)[: cap[n]]
        order += [(-v / cost[n], n, k) for k, v in enumerate(lam) if k >= ranks[n]]
    order.sort()
    for _, n, k in order:  # a matrix's grants come in k order; once one does not fit, none of its later ones do
        if ranks[n] == k and cost[n] <= left:
            ranks[n] += 1
            left -= cost[n]
    return ranks


@torch.no_grad()
def update_spectrum(layer: nn.Module, adapter: str) -> list[float]:
    """sigma_k^2 of the layer's learned dW = s B A (float64), largest first, one per rank of the adapter."""
    dw = float(layer.scaling[adapter]) * (layer.lora_B[adapter].weight.double() @ layer.lora_A[adapter].weight.double())
    return (torch.linalg.svdvals(dw)[: int(layer.r[adapter])] ** 2).cpu().tolist()


# ---- the live resize ---------------------------------------------------------------------------------

@dataclass
class ResizeReport:
    """Which parameters (names in model.named_parameters()) survived a resize as the same tensor object."""

    kept: list[str]
    new: list[str]
    removed: list[str]
    ranks_before: dict[str, int]
    ranks_after: dict[str, int]


def _lora_tuner(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTuner

    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, BaseTuner):
            return candidate
    raise FWLoRAError(f"{type(model).__name__} is not a PEFT model (wrap it with peft.get_peft_model first)")


def _lora_layers_of(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    """Every LoRA layer carrying this adapter outside modules_to_save wrappers, by name in `model`."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrapped = [n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r
            and not any(n.startswith(w + ".") for w in wrapped)}


@torch.no_grad()
def _refactor_layer(layer: nn.Module, adapter: str, r_new: int, s_new: float, config: Any) -> None:
    """Give the layer rank r_new with s_new B' A' = the best rank-r_new approximation of s B A."""
    a_old, b_mod = layer.lora_A[adapter].weight, layer.lora_B[adapter]
    dtype, device, trainable = a_old.dtype, a_old.device, a_old.requires_grad
    bias = None if b_mod.bias is None else b_mod.bias.detach().clone()
    dw = float(layer.scaling[adapter]) * (b_mod.weight.double() @ a_old.double())  # (d_out, d_in), float64
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    tol = s.max() * max(dw.shape) * torch.finfo(dtype).eps  # numerical rank as in torch.linalg.matrix_rank
    n = min(r_new, int((s > tol).sum()))  # directions copied from dW; the rest start as fresh LoRA directions
    rslora = bool(layer.use_rslora.get(adapter, False))
    dropout = layer.lora_dropout[adapter]
    cfg = copy.copy(config)
    cfg.lora_dropout = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    cfg.init_lora_weights = "gaussian" if config.init_lora_weights == "gaussian" else True
    cfg.use_rslora, cfg.use_dora, cfg.lora_bias = rslora, False, bias is not None
    alpha = s_new * (math.sqrt(r_new) if rslora else r_new)
    layer.update_layer(adapter, r_new, alpha, cfg)  # fresh A (PEFT's init), B = 0
    layer.scaling[adapter] = s_new
    for mod in (layer.lora_A[adapter], layer.lora_B[adapter]):
        mod.to(device=device, dtype=dtype)  # update_layer casts to the base layer's dtype; keep the adapter's
        mod.requires_grad_(trainable)
    root = (s[:n] / s_new).sqrt()
    a_new, b_new = layer.lora_A[adapter].weight, layer.lora_B[adapter]
    a_new[:n] = (root[:, None] * vh[:n]).to(dtype)
    b_new.weight.zero_()
    b_new.weight[:, :n] = (u[:, :n] * root).to(dtype)
    if bias is not None:
        b_new.bias.copy_(bias)
    if dist.is_available() and dist.is_initialized():  # fresh rows come from each process's RNG: use rank 0's
        dist.broadcast(a_new.data, src=0)


def resize_lora_ranks(peft_model: nn.Module, ranks: Mapping[str, int], adapter_name: str = "default",
                      scaling: float | Mapping[str, float] | None = None) -> ResizeReport:
    """Resize the named LoRA layers (names as in peft_model.named_modules()) to the given ranks in place.

    scaling: the new s' (one for all, or per name); None keeps each layer's s. Rank 0 puts the base layer
    back. Layers whose rank and scaling do not change are not touched, so their parameters (and optimizer
    state) carry over. The adapter config (target_modules, rank_pattern, alpha_pattern) is rewritten to
    describe the model as it now is, so save_pretrained / PeftModel.from_pretrained rebuild these shapes.
    """
    tuner = _lora_tuner(peft_model)
    config = tuner.peft_config[adapter_name]
    layers = _lora_layers_of(peft_model, adapter_name)
    before = dict(peft_model.named_parameters())
    ranks_before = {n: int(m.r[adapter_name]) for n, m in layers.items()}
    for name, r_new in ranks.items():
        if name not in layers:
            raise FWLoRAError(f"{name} is not a LoRA layer with adapter {adapter_name!r} in this model")
        if not _is_int(r_new) or r_new < 0:
            raise FWLoRAError(f"rank of {name} = {r_new!r}: must be an integer >= 0")
        layer = layers[name]
        if getattr(layer, "merged", False) or getattr(layer, "lora_variant", {}).get(adapter_name):
            raise FWLoRAError(f"{name} is merged or uses a LoRA variant (DoRA): its update is not s B A")
        s_old = float(layer.scaling[adapter_name])
        s_new = float(scaling[name] if isinstance(scaling, Mapping) else (s_old if scaling is None else scaling))
        if r_new == layer.r[adapter_name] and s_new == s_old:
            continue
        if r_new == 0:
            parent = peft_model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], layer.get_base_layer())
        else:
            _refactor_layer(layer, adapter_name, int(r_new), s_new, config)
    remaining = _lora_layers_of(tuner.model, adapter_name)  # names relative to the base model, as PEFT keys
    if not remaining:
        raise FWLoRAError("every LoRA layer would be removed: keep at least one rank above 0")
    config.target_modules = list(remaining)
    config.rank_pattern = {re.escape(n): int(m.r[adapter_name]) for n, m in remaining.items()}
    config.alpha_pattern = {re.escape(n): float(m.lora_alpha[adapter_name]) for n, m in remaining.items()}
    if hasattr(tuner, "targeted_module_names"):
        tuner.targeted_module_names = [n for n in tuner.targeted_module_names if n in remaining]
    after = dict(peft_model.named_parameters())
    live = _lora_layers_of(peft_model, adapter_name)
    before_ids, after_ids = {id(p) for p in before.values()}, {id(p) for p in after.values()}
    return ResizeReport(
        kept=[n for n, p in after.items() if id(p) in before_ids],
        new=[n for n, p in after.items() if id(p) not in before_ids],
        removed=[n for n, p in before.items() if id(p) not in after_ids],
        ranks_before=ranks_before,
        ranks_after={n: int(live[n].r[adapter_name]) if n in live else 0 for n in layers},
    )


def refresh_optimizer(optimizer: Any, model: nn.Module, group_of: Callable[[str], int] | None = None) -> None:
    """Point the optimizer at the model's current trainable parameters after a resize.

    State of every parameter still in the model is kept (its moments carry over); state of parameters that
    left is dropped. With one param group it gets all trainable parameters in model order. With several,
    each keeps its surviving parameters and a new one joins group_of(name), or else the one group that lost
    parameters; every group is then in model order (as a fresh optimizer's would be, so that a saved
    optimizer state loads position for position). Accepts a torch optimizer or a wrapper holding it in `.optimizer` (Accelerate's).
    """
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    current = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    present = {id(p) for _, p in current}
    groups = optimizer.param_groups
    if len(groups) == 1:
        groups[0]["params"] = [p for _, p in current]
    else:
        held = {id(p) for g in groups for p in g["params"]}
        losers = [i for i, g in enumerate(groups) if any(id(p) not in present for p in g["params"])]
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) in present]
        for name, p in current:
            if id(p) in held:
                continue
            if group_of is None and len(losers) != 1:
                raise FWLoRAError(f"cannot tell which param group the new parameter {name} belongs to: pass group_of=")
            groups[group_of(name) if group_of is not None else losers[0]]["params"].append(p)
        # each group in model order: the order an optimizer built afresh on the resized model has, so that a
        # checkpointed optimizer state (indexed by position) loads into it parameter for parameter
        position = {id(p): i for i, (_, p) in enumerate(current)}
        for g in groups:
            g["params"].sort(key=lambda p: position[id(p)])
    for p in [p for p in optimizer.state if id(p) not in present]:
        del optimizer.state[p]


# ---- the method: warm-up statistic, allocation, one resize -------------------------------------------

class FisherRankAllocation:
    """Fisher-guided rank allocation on a PEFT LoRA model.

    Usage, once per optimizer step (any number of backward passes in between):
        loss.backward(); optimizer.step()
        if fr.step():                        # True once, at step K: the model has just been resized
            refresh_optimizer(optimizer, model)
        optimizer.zero_grad()
    The hooks fold each backward pass into accumulators of their own (not .grad), so zero_grad may come
    before or after fr.step(). Calling fr.step() after optimizer.step() puts the K-th update into dW before
    it is compressed. Under DDP the model must be re-wrapped after the resize (its parameters changed).
    """

    def __init__(self, model: nn.Module, config: FWRankConfig | None = None, adapter_name: str | None = None,
                 total_steps: int | None = None):
        self.config = (config or FWRankConfig()).resolve(total_steps)
        self.model = model
        self.layers = find_lora_layers(model)
        self.names = list(self.layers)
        first = next(iter(self.layers.values()))
        self.adapter_name = adapter_name or _single_active_adapter(first)
        self.dims = {n: (int(m.in_features), int(m.out_features)) for n, m in self.layers.items()}
        rank = self.config.target_rank or int(_lora_tuner(model).peft_config[self.adapter_name].r)
        if rank > self.config.r_max:
            raise FWLoRAError(f"target rank {rank} > r_max = {self.config.r_max}: the budget could never be spent")
        if self.config.r_min > rank:
            raise FWLoRAError(f"r_min = {self.config.r_min} > target rank {rank}: the floor alone would exceed the budget")
        self.rank = rank
        self.budget = rank * sum(d_in + d_out for d_in, d_out in self.dims.values())
        self.device = first.lora_A[self.adapter_name].weight.device
        self._dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        self.steps_done = 0
        self._moments = {n: torch.zeros(min(d), min(d), dtype=self._dtype, device=self.device)
                         for n, d in self.dims.items()}
        self.ranks: dict[str, int] = {}
        self._fisher: dict[str, float] = {}
        self.gains: dict[str, list[float]] = {}
        self.param_counts = {"warmup": self._adapter_params(), "after": None, "budget": self.budget}
        self.last_resize: ResizeReport | None = None
        self._acc: dict[str, torch.Tensor] = {}
        self._omega: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._hooks = GradientHooks(self.layers, self._measuring, self._accumulate)
        self._attach_hooks()

    @property
    def in_warmup(self) -> bool:
        return self.steps_done < self.config.warmup_steps

    def _adapter_params(self) -> int:
        return sum(int(m.r[self.adapter_name]) * sum(self.dims[n]) for n, m in self.layers.items())

    # ---- warm-up statistic ----

    def _attach_hooks(self) -> None:
        if self.in_warmup:
            self._hooks.attach()

    def _detach_hooks(self) -> None:
        self._hooks.detach()

    def _accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """Fold a micro-batch into the layer's (n x k) accumulator: G^T / G (exact), (G Omega)^T / Omega'^T G."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (tokens, d_in)
        g2 = g.detach().reshape(-1, g.shape[-1]).to(dtype)  # (tokens, d_out)
        out_side = x2.shape[1] >= g2.shape[1]  # d_out <= d_in: the second moment is G G^T (d_out x d_out)
        if self.config.sketch_size == 0:
            piece = x2.T @ g2 if out_side else g2.T @ x2  # G^T (d_in, d_out) or G (d_out, d_in)
        elif out_side:
            piece = (x2 @ self._sketch(x2.shape[1], dtype)).T @ g2  # (G Omega)^T: (p, d_out)
        else:
            piece = (g2 @ self._sketch(g2.shape[1], dtype)).T @ x2  # Omega'^T G: (p, d_in)
        if name in self._acc:
            self._acc[name].add_(piece)
        else:
            self._acc[name] = piece

    def _sketch(self, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian dim x p, seeded by (seed, step, dim): the same on every process and in a resumed run."""
        key = (dim, dtype)
        if key not in self._omega:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.config.seed * 1_000_003 + self.steps_done * 7919 + dim)
            self._omega[key] = torch.randn(dim, self.config.sketch_size, generator=gen, device=self.device, dtype=dtype)
        return self._omega[key]

    def _measuring(self) -> bool:
        """Whether the current step (steps_done + 1) is a measured warm-up step."""
        return self.in_warmup and self.steps_done % self.config.measure_every == 0

    def step(self, grad_scale: float | torch.Tensor | None = None) -> bool:
        """Close one optimizer step; at step K allocate and resize. Returns True on the step that resized.

        grad_scale: a GradScaler's scale, if it multiplied the loss (a step that overflowed is left out).
        """
        if not self.in_warmup:
            return False
        if self._measuring():
            self._update_moments(grad_scale)
        self._acc.clear()
        self._omega.clear()
        self.steps_done += 1
        if self.in_warmup:
            return False
        self._allocate_and_resize()
        return True

    def _update_moments(self, grad_scale: float | torch.Tensor | None) -> None:
        if not self._acc:
            raise FWLoRAError(f"step {self.steps_done + 1}: no gradient reached any adapted layer; call fr.step() "
                              "once per optimizer step, after loss.backward()")
        ref = next(iter(self._acc.values()))
        p = self.config.sketch_size
        pieces = []
        for n in self.names:
            d_in, d_out = self.dims[n]
            shape = (max(d_in, d_out) if p == 0 else p, min(d_in, d_out))
            pieces.append(self._acc.get(n, torch.zeros(shape, dtype=ref.dtype, device=ref.device)))
        _average_over_processes(pieces)  # DDP's averaged gradient, before the (non-linear) product
        decay = self.config.beta ** self.config.measure_every
        alpha = (1.0 - decay) / max(p, 1)
        if grad_scale is not None:
            alpha /= float(grad_scale) ** 2
            if not bool(torch.stack([q.abs().sum() for q in pieces]).isfinite().all()):
                return
        for n, q in zip(self.names, pieces):
            q = q.to(self._dtype)
            self._moments[n].mul_(decay).addmm_(q.T, q, alpha=alpha)

    def _allocate_and_resize(self) -> None:
        self._detach_hooks()
        moments = [self._moments[n] for n in self.names]
        traces = torch.stack([m.trace() for m in moments]).double().cpu()
        if not bool(traces.isfinite().all()):
            bad = [n for n, t in zip(self.names, traces.tolist()) if not math.isfinite(t)]
            raise NonFiniteFisherError(f"the gradient statistic of {bad[0]} became non-finite during the warm-up "
                                       "(a NaN/inf gradient)")
        if not bool((traces > 0).any()):
            raise FWLoRAError("all Fisher scores are zero: no gradient reached the adapted layers")
        self._fisher = dict(zip(self.names, traces.tolist()))
        self.gains = {n: torch.linalg.eigvalsh(m.double()).flip(0).clamp(min=0).cpu().tolist()
                      for n, m in zip(self.names, moments)}
        cost = {n: sum(self.dims[n]) for n in self.names}
        cap = {n: min(self.config.r_max, *self.dims[n]) for n in self.names}
        if self.config.rule == "update":  # what the warm-up learned instead of its gradient (the control)
            self.gains = {n: update_spectrum(self.layers[n], self.adapter_name) for n in self.names}
            cap = {n: min(cap[n], len(self.gains[n])) for n in self.names}
        if self.config.rule == "uniform":  # capacity without allocation: every matrix truncated to the target rank
            ranks = {n: min(self.rank, cap[n]) for n in self.names}
        elif self.config.rule == "proportional":
            ranks = allocate_proportional(self._fisher, cost, self.budget, cap, self.config.r_min)
        else:
            ranks = allocate_spectrum(self.gains, cost, self.budget, cap, self.config.r_min)
        self.ranks = _same_on_every_process({n: ranks[n] for n in self.names}, self.device)
        self._moments = {}
        self._apply_ranks()

    def _apply_ranks(self) -> None:
        present = find_lora_layers(self.model)
        self.last_resize = resize_lora_ranks(
            self.model, {n: r for n, r in self.ranks.items() if n in present}, self.adapter_name)
        self.layers = {n: m for n, m in find_lora_layers(self.model).items()}
        self.param_counts["after"] = self._adapter_params()

    # ---- read-outs and state ----

    @property
    def fisher(self) -> dict[str, float]:
        """F_m = trace M_m by module name (frozen at step K)."""
        if self._fisher or not self._moments:
            return dict(self._fisher)
        return dict(zip(self.names, torch.stack([self._moments[n].trace() for n in self.names]).tolist()))

    @property
    def moments(self) -> dict[str, torch.Tensor]:
        """M_m (k x k, k = min(d_in, d_out)) by module name during warm-up; empty once allocated."""
        return dict(self._moments)

    def trained_params_over_run(self, total_steps: int) -> dict[str, float]:
        """Adapter parameters (A and B) during warm-up, after the resize, and their mean over the run's steps."""
        k = min(self.config.warmup_steps, total_steps)
        after = self.param_counts["after"] if self.param_counts["after"] is not None else self.param_counts["warmup"]
        mean = (k * self.param_counts["warmup"] + (total_steps - k) * after) / max(total_steps, 1)
        return {"warmup": self.param_counts["warmup"], "after": after, "mean": mean, "budget": self.budget}

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "names": list(self.names), "config": asdict(self.config),
                "dims": {n: list(d) for n, d in self.dims.items()}, "budget": self.budget,
                "ranks": dict(self.ranks), "fisher": dict(self._fisher), "param_counts": dict(self.param_counts),
                "moments": {n: m.detach().clone() for n, m in self._moments.items()},
                "gains": {n: torch.tensor(v, dtype=torch.float64) for n, v in self.gains.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a state past step K re-applies its ranks to this model (a no-op where shapes already match)."""
        if state["config"] != asdict(self.config):
            raise FWLoRAError(f"saved fwrank state has config {state['config']}, this run has {asdict(self.config)}")
        dims = {n: tuple(d) for n, d in state["dims"].items()}
        if any(dims.get(n) != d for n, d in self.dims.items()):
            raise FWLoRAError("saved fwrank state belongs to a model with other adapted layers")
        self._detach_hooks()
        self.steps_done, self.names, self.dims = int(state["steps_done"]), list(state["names"]), dims
        self.budget, self.param_counts = int(state["budget"]), dict(state["param_counts"])
        self._acc.clear()
        if self.in_warmup:
            if list(self.layers) != self.names:
                raise FWLoRAError("a mid-warm-up fwrank state needs the model at its warm-up shapes")
            self._moments = {n: state["moments"][n].to(self.device, self._dtype).clone() for n in self.names}
            self.ranks, self._fisher, self.gains = {}, {}, {}
            self._attach_hooks()
            return
        self.ranks = {n: int(r) for n, r in state["ranks"].items()}
        missing = [n for n in self.names if n not in self.layers and self.ranks[n] > 0]
        if missing:
            raise FWLoRAError(f"the model lacks adapted layers the saved allocation keeps: {missing[:3]}")
        self._fisher = {n: float(v) for n, v in state["fisher"].items()}
        self.gains = {n: torch.as_tensor(v).tolist() for n, v in state["gains"].items()}
        self._moments = {}
        self._apply_ranks()

    def save(self, directory: str | Path) -> Path:
        """Write the state as safetensors plus JSON metadata (no pickle)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {f"moment:{n}": m.cpu().contiguous() for n, m in state.pop("moments").items()}
        tensors |= {f"gain:{n}": g.contiguous() for n, g in state.pop("gains").items()}
        if not tensors:
            tensors["empty"] = torch.zeros(0)
        path = Path(directory) / RANK_STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), {k: json.dumps(v) for k, v in state.items()})
        tmp.replace(path)
        return path

    def load(self, directory: str | Path) -> None:
        self.load_state_dict(_read_state(directory))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> "FisherRankAllocation":
        """Rebuild from a directory written by save(), for a model at the warm-up or the resized shapes."""
        state = _read_state(directory)
        fr = cls(model, FWRankConfig(**state["config"]))
        fr.load_state_dict(state)
        return fr

    def remove(self) -> None:
        """Detach the hooks (the model is left as it is)."""
        self._detach_hooks()


def _read_state(directory: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(directory) / RANK_STATE_FILE
    if not path.is_file():
        raise FWLoRAError(f"no fwrank state at {path}")
    with safe_open(str(path), framework="pt") as f:
        state = {k: json.loads(v) for k, v in f.metadata().items()}
        for kind, key in (("moment", "moments"), ("gain", "gains")):
            state[key] = {k.split(":", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(kind + ":")}
    return state


def _same_on_every_process(ranks: dict[str, int], device: torch.device) -> dict[str, int]:
    """Take process 0's allocation everywhere (eigvalsh may differ in the last bit across devices)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ranks
    t = torch.tensor(list(ranks.values()), dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return dict(zip(ranks, t.tolist()))
