"""fwrank: rank allocation for PEFT LoRA, measured during a warm-up, applied once (docs/method.md).

Train plain LoRA for K optimizer steps while the warm-up statistic (methods/gradients/) sees every adapted
layer's input x and output gradient g, then give each matrix m a rank r_m under a hard budget and resize the
live model once (methods/ranks.py: the rules and the resize every rank-allocating method shares). The
statistic, per layer, is an EMA of the second moment of G = dL/dW on its smaller side (k = min(d_in, d_out)):

    d_out <= d_in:  M <- beta M + (1 - beta) Y^T Y / p,  Y = (G Omega)^T  = (x Omega)^T g    (p x d_out)
    d_in  <  d_out: M <- beta M + (1 - beta) Z^T Z / p,  Z = Omega'^T G   = (g Omega')^T x   (p x d_in)

Its eigenvalues at step K are the gradient's spectrum; trace M is an unbiased estimate of FW-LoRA's
F_m = EMA ||G_m||_F^2. M and the mean gradient are float64 on every device, as FW-LoRA's F (stat_dtype; MPS alone
has no float64): the allocation then does not depend on where the run happened, and the k x k EMA costs little
next to the step (p k^2 multiply-adds per layer). Depends on torch, peft, fwlora.errors / files / checks,
methods/gradients/, methods/lowrank.py and methods/ranks.py only.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from fwlora.errors import MethodError, NonFiniteFisherError
from fwlora.methods.fwrank.config import FWRankConfig
from fwlora.lowrank import lora_delta
from fwlora.methods.ranks import (ResizeReport, allocate_proportional, allocate_spectrum, lora_tuner, output_energy,
                                  resize_lora_ranks, uniform_ranks, update_spectrum)
from fwlora.methods.gradients import (GradientHooks, GradientStatistic, SavedState, check_reachable,
                                      find_lora_layers, is_fraction, matches_saved, same_on_every_process,
                                      single_active_adapter, stat_dtype)

RANK_STATE_FILE = "fwrank_state.safetensors"


class FisherRankAllocation(SavedState):
    """Fisher-guided rank allocation on a PEFT LoRA model.

    Usage, once per optimizer step (any number of backward passes in between):
        loss.backward(); optimizer.step()
        if fr.step():                        # True once, at step K: the model has just been resized
            refresh_optimizer(optimizer, model)
        optimizer.zero_grad()
    The hooks fold each backward pass into accumulators of their own (not .grad), so zero_grad may come
    before or after fr.step(). Calling fr.step() after optimizer.step() puts the K-th update into dW before
    it is compressed. Under DDP the model must be re-wrapped after the resize (its parameters changed).
    total_steps: the run's optimizer steps, needed when warmup_steps is a fraction of the run (0.25).
    """

    state_file, state_what, config_class = RANK_STATE_FILE, "fwrank", FWRankConfig

    def __init__(self, model: nn.Module, config: FWRankConfig | None = None, adapter_name: str | None = None,
                 total_steps: int | None = None):
        self.config = config or FWRankConfig()
        self.model = model
        self.layers = find_lora_layers(model)
        self.names = list(self.layers)
        first = next(iter(self.layers.values()))
        self.adapter_name = adapter_name or single_active_adapter(first)
        self.dims = {n: (int(m.in_features), int(m.out_features)) for n, m in self.layers.items()}
        rank = self.config.target_rank or int(lora_tuner(model).peft_config[self.adapter_name].r)
        if rank > self.config.r_max:
            raise MethodError(f"target rank {rank} > r_max = {self.config.r_max}: the budget could never be spent")
        if self.config.r_min > rank:
            raise MethodError(f"r_min = {self.config.r_min} > target rank {rank}: the floor alone would exceed the budget")
        self.rank = rank
        self.budget = rank * sum(d_in + d_out for d_in, d_out in self.dims.values())
        self.device = first.lora_A[self.adapter_name].weight.device
        self._dtype = stat_dtype(self.device)  # float64 on CPU and GPU alike (see the module docstring)
        self._moments = {n: torch.zeros(min(d), min(d), dtype=self._dtype, device=self.device) for n, d in self.dims.items()}
        self.ranks: dict[str, int] = {}
        self._fisher: dict[str, float] = {}
        self.gains: dict[str, list[float]] = {}
        self.signals: dict[str, dict[str, float]] = {}  # per-matrix signals at step K (record_signals, or the rule's)
        self.param_counts = {"warmup": self._adapter_params(), "after": None, "budget": self.budget}
        self.last_resize: ResizeReport | None = None
        self._mean: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, list] = {}  # name -> [A when the inputs were seen, sum (A x)(A x)^T, token count]
        self.statistic: GradientStatistic | None = None
        self._mean_stat: GradientStatistic | None = None
        self._input_hooks: GradientHooks | None = None
        if not is_fraction(self.config.warmup_steps) or total_steps is not None:
            self.start(total_steps)

    def start(self, total_steps: int | None) -> None:
        """Count K in the run's optimizer steps (where warmup_steps is a fraction) and refuse a K the run never
        reaches. The constructor does it when given total_steps; the Trainer callback when training begins."""
        if self.statistic is None:
            self.config = self.config.resolve(total_steps)
            self.statistic = GradientStatistic(self.layers, self.config, self._fold, self.device, side="smaller")
            # the average gradient E[G] through one fixed sketch (the SNR signal), and the inputs of the last
            # warm-up step seen through each adapter's A (the output-energy signal): only where asked for
            if self.config.needs_mean_gradient:
                self._mean_stat = GradientStatistic(self.layers, self.config, self._fold_mean, self.device,
                                                    side="input", fresh_sketch=False)
            if self.config.needs_input_energy:
                self._input_hooks = GradientHooks(self.layers, self._last_warmup_step, self._fold_inputs)
                self._input_hooks.attach()
        if self.in_warmup:
            check_reachable(self.config.warmup_steps, total_steps, "the rank allocation")

    def _started(self) -> GradientStatistic:
        if self.statistic is None:
            raise MethodError(f"FWRankConfig.warmup_steps = {self.config.warmup_steps} is a fraction of the run: call "
                              "start(total_steps) before training (the Trainer callback does)")
        return self.statistic

    @property
    def steps_done(self) -> int:
        """Warm-up steps closed (fwrank does nothing after step K)."""
        return min(self.statistic.steps_done, self.config.warmup_steps) if self.statistic is not None else 0

    @property
    def in_warmup(self) -> bool:
        return self.statistic is None or self.statistic.in_warmup

    def _adapter_params(self) -> int:
        return sum(int(m.r[self.adapter_name]) * sum(self.dims[n]) for n, m in self.layers.items())

    # ---- warm-up statistic ----

    def step(self, grad_scale: float | torch.Tensor | None = None) -> bool:
        """Close one optimizer step; at step K allocate and resize. Returns True on the step that resized.

        grad_scale: a GradScaler's scale, if it multiplied the loss (a step that overflowed is left out).
        """
        if not self.in_warmup:
            return False
        statistic = self._started()
        if self._mean_stat is not None:
            self._mean_stat.step(grad_scale)
        if not statistic.step(grad_scale):
            return False
        self._allocate_and_resize()
        return True

    def _fold(self, pieces: list[torch.Tensor], grad_scale: float | torch.Tensor | None) -> None:
        p = self.config.sketch_size
        decay = self.statistic.decay
        alpha = (1.0 - decay) / max(p, 1)
        if grad_scale is None:
            for n, q in zip(self.names, pieces):
                q = q.to(self._dtype)
                self._moments[n].mul_(decay).addmm_(q.T, q, alpha=alpha)
            return
        # a step the scaler skips (its gradient overflowed) leaves M as it was: a mask on the device, not a host sync
        finite = _all_finite(pieces)
        scale = torch.as_tensor(grad_scale, dtype=self._dtype, device=self.device)
        for n, q in zip(self.names, pieces):
            q = q.to(self._dtype) / scale
            m = self._moments[n]
            m.copy_(torch.where(finite, m.mul(decay).addmm_(q.T, q, alpha=alpha), m))

    def _fold_mean(self, pieces: list[torch.Tensor], grad_scale: float | torch.Tensor | None) -> None:
        decay = self.statistic.decay
        finite = None
        if grad_scale is not None:
            finite = _all_finite(pieces)
            scale = torch.as_tensor(grad_scale, dtype=self._dtype, device=self.device)
            pieces = [q.to(self._dtype) / scale for q in pieces]
        for n, q in zip(self.names, pieces):
            q = q.to(self._dtype)
            new = self._mean[n].mul(decay).add_(q, alpha=1.0 - decay) if n in self._mean else q * (1.0 - decay)
            self._mean[n] = new if finite is None else torch.where(finite, new, self._mean.get(n, torch.zeros_like(q)))

    def _last_warmup_step(self) -> bool:
        return self.statistic.steps_done == self.config.warmup_steps - 1

    def _fold_inputs(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """On the K-th step: the layer's inputs through its adapter's A, tokens the loss reaches only."""
        with torch.no_grad():
            x2 = x.reshape(-1, x.shape[-1])
            keep = g.detach().reshape(-1, g.shape[-1]).ne(0).any(dim=1)
            a = self.layers[name].lora_A[self.adapter_name].weight.detach()
            proj = (x2[keep].to(a.dtype) @ a.T).double()  # (tokens, r)
            entry = self._inputs.setdefault(name, [a.double().clone(), torch.zeros(a.shape[0], a.shape[0],
                                                                                     dtype=torch.float64, device=a.device), 0])
            entry[1] += proj.T @ proj
            entry[2] += int(keep.sum())

    def _allocate_and_resize(self) -> None:
        if self._input_hooks is not None:
            self._input_hooks.detach()
        moments = [self._moments[n] for n in self.names]
        traces = torch.stack([m.trace() for m in moments]).double().cpu()
        if not bool(traces.isfinite().all()):
            bad = [n for n, t in zip(self.names, traces.tolist()) if not math.isfinite(t)]
            raise NonFiniteFisherError(f"the gradient statistic of {bad[0]} became non-finite during the warm-up "
                                       "(a NaN/inf gradient)")
        if not bool((traces > 0).any()):
            raise MethodError("all Fisher scores are zero: no gradient reached the adapted layers")
        self._fisher = dict(zip(self.names, traces.tolist()))
        self.gains = {n: torch.linalg.eigvalsh(m.double()).flip(0).clamp(min=0).cpu().tolist()
                      for n, m in zip(self.names, moments)}
        self._measure_signals()
        cost = {n: sum(self.dims[n]) for n in self.names}
        cap = {n: min(self.config.r_max, *self.dims[n]) for n in self.names}
        rule = self.config.rule
        if rule in ("update", "energy"):  # what the warm-up learned instead of its gradient
            self.gains = {n: self._spectra[rule][n] for n in self.names}
            cap = {n: min(cap[n], len(self.gains[n])) for n in self.names}
        if rule == "uniform":
            ranks = uniform_ranks(self.names, self.rank, cap)
        elif rule in ("proportional", "snr"):
            scores = self._fisher if rule == "proportional" else self.signals["snr"]
            ranks = allocate_proportional(scores, cost, self.budget, cap, self.config.r_min)
        else:
            ranks = allocate_spectrum(self.gains, cost, self.budget, cap, self.config.r_min)
        self.ranks = same_on_every_process({n: ranks[n] for n in self.names}, self.device)
        self._moments, self._mean, self._inputs = {}, {}, {}
        self._apply_ranks()

    def _measure_signals(self) -> None:
        """The learned update's spectrum, each direction's output energy and the gradient's SNR at step K,
        where the rule or record_signals asks for them (per-matrix totals kept in self.signals)."""
        self._spectra: dict[str, dict[str, list[float]]] = {}
        want = self.config.record_signals
        if want or self.config.rule == "update":
            self._spectra["update"] = {n: update_spectrum(self.layers[n], self.adapter_name) for n in self.names}
        if self.config.needs_input_energy:
            energy = {}
            for n in self.names:
                layer = self.layers[n]
                basis, gram, count = self._inputs.get(n, [layer.lora_A[self.adapter_name].weight, None, 0])
                energy[n] = output_energy(lora_delta(layer, self.adapter_name), basis,
                                          gram if gram is not None else torch.zeros(1, 1), count)
            self._spectra["energy"] = energy
        if self.config.needs_mean_gradient:
            p = max(self.config.sketch_size, 1)
            self.signals["snr"] = {n: (float(self._mean[n].square().sum()) / p / self._fisher[n]
                                       if n in self._mean and self._fisher[n] > 0 else 0.0) for n in self.names}
        if want:
            self.signals["fisher"] = dict(self._fisher)
            for kind, spectra in self._spectra.items():
                self.signals[kind] = {n: float(sum(v)) for n, v in spectra.items()}

    def _apply_ranks(self) -> None:
        present = find_lora_layers(self.model)
        self.last_resize = resize_lora_ranks(self.model, {n: r for n, r in self.ranks.items() if n in present},
                                             self.adapter_name)
        self.layers = dict(find_lora_layers(self.model))
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
                "signals": {k: dict(v) for k, v in self.signals.items()},
                "moments": {n: m.detach().clone() for n, m in self._moments.items()},
                "means": {n: m.detach().clone() for n, m in self._mean.items()},
                "gains": {n: torch.tensor(v, dtype=torch.float64) for n, v in self.gains.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a state past step K re-applies its ranks to this model (a no-op where shapes already match)."""
        if not matches_saved(self.config, state["config"]):
            raise MethodError(f"saved fwrank state has config {state['config']}, this run has {asdict(self.config)}")
        if self.statistic is None:  # K was a fraction of the run: the saved state says how many steps it is
            self.config = FWRankConfig(**state["config"])
            self.start(None)
        dims = {n: tuple(d) for n, d in state["dims"].items()}
        if any(dims.get(n) != d for n, d in self.dims.items()):
            raise MethodError("saved fwrank state belongs to a model with other adapted layers")
        steps = int(state["steps_done"])
        self.statistic.restore(steps)
        if self._mean_stat is not None:
            self._mean_stat.restore(steps)
        self.names, self.dims = list(state["names"]), dims
        self.budget, self.param_counts = int(state["budget"]), dict(state["param_counts"])
        self.signals = {k: dict(v) for k, v in (state.get("signals") or {}).items()}
        if self.in_warmup:
            if list(self.layers) != self.names:
                raise MethodError("a mid-warm-up fwrank state needs the model at its warm-up shapes")
            self._moments = {n: state["moments"][n].to(self.device, self._dtype).clone() for n in self.names}
            self._mean = {n: m.to(self.device, self._dtype).clone() for n, m in (state.get("means") or {}).items()}
            self.ranks, self._fisher, self.gains = {}, {}, {}
            return
        if self._input_hooks is not None:
            self._input_hooks.detach()
        self.ranks = {n: int(r) for n, r in state["ranks"].items()}
        missing = [n for n in self.names if n not in self.layers and self.ranks[n] > 0]
        if missing:
            raise MethodError(f"the model lacks adapted layers the saved allocation keeps: {missing[:3]}")
        self._fisher = {n: float(v) for n, v in state["fisher"].items()}
        self.gains = {n: torch.as_tensor(v).tolist() for n, v in state["gains"].items()}
        self._moments, self._mean = {}, {}
        self._apply_ranks()

    def pack_tensors(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        tensors = {f"moment:{n}": m for n, m in state.pop("moments").items()}
        tensors |= {f"mean:{n}": m for n, m in state.pop("means").items()}
        return tensors | {f"gain:{n}": g for n, g in state.pop("gains").items()}

    @classmethod
    def unpack_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        for kind, key in (("moment", "moments"), ("mean", "means"), ("gain", "gains")):
            meta[key] = {k.split(":", 1)[1]: t for k, t in tensors.items() if k.startswith(kind + ":")}
        return meta

    def remove(self) -> None:
        """Detach the hooks (the model is left as it is)."""
        if self.statistic is not None:
            self.statistic.remove()
        if self._mean_stat is not None:
            self._mean_stat.remove()
        if self._input_hooks is not None:
            self._input_hooks.detach()


def _all_finite(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Whether every piece is finite, as a 0-dim bool on the device (torch.where selects with it, no host sync)."""
    return torch.stack([q.abs().sum() for q in pieces]).isfinite().all()

