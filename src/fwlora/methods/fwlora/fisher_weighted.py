"""FW-LoRA on a PEFT LoRA model: the Fisher warm-up, then the Fisher-weighted penalty (docs/method.md).

During a warm-up of K optimizer steps it keeps, for every LoRA-adapted linear layer m, an exponential
moving average of g_m(t) = ||dL_t / dW_m||_F^2, the squared Frobenius norm of the step's gradient with
respect to the frozen weight W_m (measured by methods/gradients/ without autograd's weight gradients):

    F_m <- beta * F_m + (1 - beta) * g_m(t)                     (t = 1..K, F_m = 0 at the start)

After step K the scores are frozen and normalised once, I_m = F_m / sum_m' F_m', and from step K+1 on

    L_total = L_task + lambda * sum_m (1 - I_m) * ||s_m B_m A_m||_F^2.

Depends on torch, peft, fwlora.errors / files / checks and methods/gradients/ only: copy this folder and that one to
have FW-LoRA in another project.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from fwlora.errors import MethodError, NonFiniteFisherError
from fwlora.methods.fwlora.config import FWLoRAConfig
from fwlora.methods.fwlora.penalty import delta_weight_sq_norm, normalise, penalty_weights
from fwlora.methods.gradients import (GradientStatistic, SavedState, check_reachable, find_lora_layers,
                                      is_fraction, matches_saved, single_active_adapter, stat_dtype)

STATE_FILE = "fwlora_state.safetensors"


class FisherWeightedLoRA(SavedState):
    """FW-LoRA on a PEFT LoRA model.

    Usage, once per optimizer step (any number of backward passes in between):
        loss = task_loss + fw.penalty()   # a zero tensor during warm-up
        loss.backward()
        fw.step()                         # after backward, before zero_grad

    total_steps: the run's optimizer steps, needed when warmup_steps is a fraction of the run (0.25), and
    used to refuse a K the run never reaches.
    """

    state_file, state_what, config_class = STATE_FILE, "FW-LoRA", FWLoRAConfig

    def __init__(self, model: nn.Module, config: FWLoRAConfig | None = None, adapter_name: str | None = None,
                 total_steps: int | None = None):
        self.config = config or FWLoRAConfig()
        self.model = model
        self.layers = find_lora_layers(model)
        self.names = list(self.layers)
        first = next(iter(self.layers.values()))
        self.adapter_name = adapter_name or single_active_adapter(first)
        for name, layer in self.layers.items():
            if self.adapter_name not in layer.lora_A:
                raise MethodError(f"{name} has no LoRA adapter named {self.adapter_name!r}")
        self.device = first.lora_A[self.adapter_name].weight.device
        self._fisher = torch.zeros(len(self.names), dtype=stat_dtype(self.device), device=self.device)
        # first step at which a layer's statistic was not finite, per layer (-1: none); kept on the device
        self._first_nonfinite = torch.full((len(self.names),), -1, dtype=torch.long, device=self.device)
        self._importance: torch.Tensor | None = None
        self._groups: list[tuple[list[int], torch.Tensor]] = []  # (layer indices, (1 - I_m) s_m^2)
        self.statistic: GradientStatistic | None = None
        if not is_fraction(self.config.warmup_steps) or total_steps is not None:
            self.start(total_steps)

    def start(self, total_steps: int | None) -> None:
        """Count K in the run's optimizer steps (where warmup_steps is a fraction) and refuse a K the run never
        reaches. The constructor does it when given total_steps; the Trainer callback when training begins."""
        if self.statistic is None:
            self.config = self.config.resolve(total_steps)
            sketch = 0 if self.config.estimator == "exact" else self.config.sketch_size
            self.statistic = GradientStatistic(self.layers, self.config, self._fold, self.device, side="input",
                                               sketch_size=sketch)
        if self.in_warmup:
            check_reachable(self.config.warmup_steps, total_steps, "the FW-LoRA penalty")

    def _started(self) -> GradientStatistic:
        if self.statistic is None:
            raise MethodError(f"FWLoRAConfig.warmup_steps = {self.config.warmup_steps} is a fraction of the run: call "
                              "fw.start(total_steps) before training (the Trainer callback does)")
        return self.statistic

    # ---- warm-up: measuring ||dL/dW_m||^2 -------------------------------------------------------

    @property
    def steps_done(self) -> int:
        return self.statistic.steps_done if self.statistic is not None else 0

    @property
    def in_warmup(self) -> bool:
        return self.statistic is None or self.statistic.in_warmup

    def step(self, grad_scale: float | torch.Tensor | None = None) -> None:
        """Close one optimizer step: fold the step's gradient norms into F; at step K freeze F and set I.

        grad_scale: the loss scale of a torch.amp.GradScaler (scaler.get_scale()), if one multiplied the
        loss; the statistic is unscaled by it, and a step whose gradient overflowed is left out of F.
        """
        if self._started().step(grad_scale):
            self._finish_warmup()

    def _fold(self, pieces: list[torch.Tensor], grad_scale: float | torch.Tensor | None) -> None:
        sq_norms = torch.stack([p.square().sum(dtype=self._fisher.dtype) for p in pieces])
        if self.config.estimator == "sketch":
            sq_norms = sq_norms / self.config.sketch_size
        decay = self.statistic.decay
        if grad_scale is not None:
            scale = torch.as_tensor(grad_scale, dtype=self._fisher.dtype, device=self.device)
            sq_norms = sq_norms / scale.square()
            # the scaler skips an overflowed step; so does F (selected on the device: no host sync per step)
            self._fisher.copy_(torch.where(torch.isfinite(sq_norms).all(),
                                           self._fisher.mul(decay).add_(sq_norms, alpha=1.0 - decay), self._fisher))
            return
        step = self.steps_done + 1
        bad = ~torch.isfinite(sq_norms) & (self._first_nonfinite < 0)
        self._first_nonfinite = torch.where(bad, torch.full_like(self._first_nonfinite, step), self._first_nonfinite)
        self._fisher.mul_(decay).add_(sq_norms, alpha=1.0 - decay)

    def _finish_warmup(self) -> None:
        self._check_fisher()
        self._importance = normalise(self._fisher, self.config.normalization)
        self._build_penalty()

    def penalty_weights(self) -> torch.Tensor:
        """w_m of the penalty lambda sum_m w_m ||dW_m||^2 (see penalty.penalty_weights)."""
        return penalty_weights(self._importance, self.config.normalization, self.config.gamma)

    def _check_fisher(self) -> None:
        for name, step in zip(self.names, self._first_nonfinite.tolist()):
            if step >= 0:
                raise NonFiniteFisherError(f"the Fisher score of {name} became non-finite at step {step} "
                                           "(a NaN/inf gradient in the warm-up)")
        if not bool((self._fisher > 0).any()):
            raise MethodError(
                f"all Fisher scores are zero after {self.steps_done} warm-up steps: no gradient reached the adapted "
                "layers (are they in the forward path, and does the loss depend on them?)")

    # ---- after warm-up: the penalty ---------------------------------------------------------------

    def _build_penalty(self) -> None:
        """Group layers of equal adapter shape so the penalty is a few batched ops, not one per layer."""
        scalings = torch.tensor([float(self.layers[n].scaling[self.adapter_name]) for n in self.names], dtype=torch.float64)
        weights = self.penalty_weights().cpu() * scalings.double().square()  # w_m s_m^2: ||s B A||^2 = s^2 ||B A||^2
        groups: dict[tuple, list[int]] = {}
        for i, name in enumerate(self.names):
            a, b = self._adapter_weights(name)
            groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(i)
        self._groups = [(idx, weights[idx].to(self.device)) for idx in groups.values()]

    def _adapter_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[name]
        return layer.lora_A[self.adapter_name].weight, layer.lora_B[self.adapter_name].weight

    def add_penalty_gradients(self, grad_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """Add the penalty's gradient to the adapters' .grad (the same as adding it to the loss, without a
        second backward through the model: d/dB = 2 lambda w s^2 B (A A^T), d/dA = 2 lambda w s^2 (B^T B) A).
        grad_scale: the GradScaler's scale, where the gradients are still scaled. Returns the penalty."""
        penalty = self.penalty()
        if not penalty.requires_grad:
            return penalty.detach()
        params = [w for n in self.names for w in self._adapter_weights(n)]
        grads = torch.autograd.grad(penalty, params, allow_unused=True)
        scale = grad_scale if grad_scale is not None else 1.0  # a float or a tensor: no host sync either way
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                g = g.to(p.dtype) * scale
                p.grad = g if p.grad is None else p.grad.add_(g)
        return penalty.detach()

    def penalty(self) -> torch.Tensor:
        """lambda * sum_m (1 - I_m) ||dW_m||_F^2: zero during warm-up, differentiable afterwards."""
        if self.in_warmup or self.config.lambda_fw == 0:
            return torch.zeros((), device=self.device)
        with torch.autocast(device_type=self.device.type, enabled=False):  # fp32 math under amp
            terms = []
            for idx, weights in self._groups:
                pairs = [self._adapter_weights(self.names[i]) for i in idx]
                dtype = torch.promote_types(pairs[0][0].dtype, torch.float32)  # fp32 at least
                a = torch.stack([p[0] for p in pairs]).to(dtype)  # (layers, r, d_in)
                b = torch.stack([p[1] for p in pairs]).to(dtype)  # (layers, d_out, r)
                terms.append((weights.to(dtype) * delta_weight_sq_norm(a, b, 1.0)).sum())
            return self.config.lambda_fw * torch.stack(terms).sum()

    # ---- read-outs and state ----------------------------------------------------------------------

    @property
    def fisher(self) -> dict[str, float]:
        """F_m by module name (the EMA so far; frozen after warm-up)."""
        return dict(zip(self.names, self._fisher.tolist()))

    @property
    def importance(self) -> dict[str, float]:
        """I_m by module name; empty until warm-up has ended."""
        if self._importance is None:
            return {}
        return dict(zip(self.names, self._importance.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "names": list(self.names), "config": asdict(self.config),
                "fisher": self._fisher.detach().clone(), "first_nonfinite": self._first_nonfinite.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise MethodError("saved FW-LoRA state belongs to a model with other adapted layers")
        if not matches_saved(self.config, state["config"]):
            raise MethodError(f"saved FW-LoRA state has config {state['config']}, this run has {asdict(self.config)}")
        if self.statistic is None:  # K was a fraction of the run: the saved state says how many steps it is
            self.config = FWLoRAConfig(**state["config"])
            self.start(None)
        self._fisher = state["fisher"].to(self.device, self._fisher.dtype).clone()
        self._first_nonfinite = state["first_nonfinite"].to(self.device).clone()
        self._importance = None
        self._started().restore(int(state["steps_done"]))
        if not self.in_warmup:
            self._finish_warmup()

    def pack_tensors(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: state.pop(k) for k in ("fisher", "first_nonfinite")}

    @classmethod
    def unpack_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**meta, "fisher": tensors["fisher"], "first_nonfinite": tensors["first_nonfinite"]}

    def remove(self) -> None:
        """Detach the hooks (the model is left as it was)."""
        if self.statistic is not None:
            self.statistic.remove()

