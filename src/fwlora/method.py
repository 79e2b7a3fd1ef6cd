"""Fisher-Weighted LoRA: the method alone, line by line against docs/METHOD.md.

FW-LoRA is plain LoRA plus one loss term. During a warm-up of K optimizer steps it keeps, for every
LoRA-adapted linear layer m, an exponential moving average of g_m(t) = ||dL_t / dW_m||_F^2, the squared
Frobenius norm of the step's gradient with respect to the frozen weight W_m:

    F_m <- beta * F_m + (1 - beta) * g_m(t)                     (t = 1..K, F_m = 0 at the start)

After step K the scores are frozen and normalised once, I_m = F_m / sum_m' F_m', and from step K+1 on

    L_total = L_task + lambda * sum_m (1 - I_m) * ||s_m B_m A_m||_F^2.

This file depends only on torch and peft, so copying it into another project gives FW-LoRA.

How the statistic is measured without touching autograd's weight gradients: for a linear layer
y = x W^T, dL/dW = G = sum_tokens g x^T (g = dL/dy). A forward hook on each LoRA layer keeps its input x
and hangs a tensor hook on its output y that receives g in the backward pass. The hook folds each micro-batch into
a per-layer accumulator; fw.step() (once per optimizer step) averages the accumulators over
data-parallel processes, as DDP averages gradients, and only then takes the norm. So the statistic is
that of the global batch the optimizer step sees, however it is split.

Two estimators:
- "exact": the accumulator is G itself (d_out x d_in, in float32 or better), freed after every step.
- "sketch": the accumulator is (G Omega)^T, with Omega a d_in x p Gaussian matrix drawn afresh each step
  (the same on every process). E ||G Omega||_F^2 = p ||G||_F^2, so ||G Omega||^2 / p is unbiased; it
  costs p (d_in + d_out) per token instead of d_in * d_out, and keeps p x d_out numbers per layer.
`measure_every=k` measures one warm-up step in k and updates the EMA with beta**k, so the average
spans the same number of steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

STATE_FILE = "fwlora_state.safetensors"


class FWLoRAError(ValueError):
    """A problem the user can fix: a bad setting, an unsupported model, a Fisher no gradient reached."""


class NonFiniteFisherError(FloatingPointError):
    """A layer's gradient statistic became NaN/inf during the warm-up: training diverged (not a user error)."""


DEFAULT_MEASURE_EVERY = 8


@dataclass
class FWLoRAConfig:
    """Settings of FW-LoRA. Defaults are METHOD.md's."""

    lambda_fw: float = field(default=1e-4, metadata={"help": "weight lambda of the Fisher-weighted penalty"})
    warmup_steps: int = field(default=500, metadata={"help": "K: optimizer steps that measure the Fisher scores"})
    beta: float = field(default=0.98, metadata={"help": "EMA factor of the Fisher scores, in (0, 1)"})
    estimator: Literal["exact", "sketch"] = field(default="sketch", metadata={
        "help": "'sketch' (default): an unbiased Gaussian sketch ||G Omega||^2 / p; 'exact': ||G||^2. With one warm-up "
                "step in 8 measured, the sketch keeps the whole run at ~1.01x LoRA and ranks the matrices as the "
                "exact statistic every step does (Spearman 0.996; README)"})
    sketch_size: int = field(default=8, metadata={"help": "p: columns of the sketch (estimator='sketch')"})
    measure_every: int | None = field(default=None, metadata={
        "help": "measure one warm-up step in this many; default min(8, warmup_steps); 1 = every step (METHOD.md's "
                "schedule: with estimator='exact', release 1's statistic)"})
    normalization: Literal["sum", "max", "mean"] = field(default="sum", metadata={
        "help": "penalty weights: 'sum' (METHOD.md): 1 - F_m / sum F; 'max': 1 - F_m / max F; "
                "'mean': (mean F / F_m)^gamma, a weight that spreads as widely as the scores do"})
    gamma: float = field(default=1.0, metadata={"help": "exponent of the 'mean' normalisation (0: uniform weights)"})
    seed: int = field(default=0, metadata={"help": "seed of the sketch matrices"})

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> FWLoRAError:
            return FWLoRAError(f"FWLoRAConfig.{name} = {getattr(self, name)!r}: {why}")

        if not _is_real(self.lambda_fw) or not math.isfinite(self.lambda_fw) or self.lambda_fw < 0:
            raise bad("lambda_fw", "must be a finite number >= 0")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 1:
            raise bad("warmup_steps", "must be >= 1 (an integer: the scores need at least one step)")
        if not _is_real(self.beta) or not 0.0 < self.beta < 1.0:
            raise bad("beta", "must lie strictly between 0 and 1")
        if self.estimator not in ("exact", "sketch"):
            raise bad("estimator", "must be 'exact' or 'sketch'")
        if not _is_int(self.sketch_size) or self.sketch_size < 1:
            raise bad("sketch_size", "must be an integer >= 1")
        if self.measure_every is None:
            self.measure_every = min(DEFAULT_MEASURE_EVERY, self.warmup_steps) if _is_int(self.warmup_steps) else 1
        if not _is_int(self.measure_every) or not 1 <= self.measure_every <= self.warmup_steps:
            raise bad("measure_every", f"must be an integer in [1, warmup_steps={self.warmup_steps}]")
        if self.normalization not in ("sum", "max", "mean"):
            raise bad("normalization", "must be 'sum', 'max' or 'mean'")
        if not _is_real(self.gamma) or not math.isfinite(self.gamma) or self.gamma < 0:
            raise bad("gamma", "must be a finite number >= 0")
        if not _is_int(self.seed):
            raise bad("seed", "must be an integer")


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def delta_weight_sq_norm(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||s B A||_F^2 = s^2 trace((B^T B)(A A^T)) without forming the d_out x d_in product.

    Works batched: A (..., r, d_in), B (..., d_out, r) give (...). Both Gram matrices are symmetric, so
    the trace of their product is the sum of their elementwise product.
    """
    gram_a = lora_A @ lora_A.transpose(-1, -2)  # (..., r, r)
    gram_b = lora_B.transpose(-1, -2) @ lora_B  # (..., r, r)
    return scaling**2 * (gram_a * gram_b).sum(dim=(-1, -2))


def find_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA-adapted linear layer of a PEFT LoRA model, by name in model.named_modules().

    Layers inside a modules_to_save wrapper (the task head) are left out. An AdaLoRA model, a model
    without LoRA layers and LoRA on non-linear layers are refused with a message.
    """
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrapped = [n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, AdaLoraLayer):
            raise FWLoRAError(
                f"{name} is an AdaLoRA layer: AdaLoRA allocates rank by itself; FW-LoRA applies to plain LoRA models"
            )
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # the task head: trained in full, not part of the adapter budget
        base = module.get_base_layer()
        if not (isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D"):
            raise FWLoRAError(
                f"{name} adapts a {type(base).__name__}: FW-LoRA supports LoRA on linear layers only; "
                "leave this module out of target_modules"
            )
        if getattr(module, "lora_variant", None):
            raise FWLoRAError(f"{name} uses a LoRA variant (e.g. DoRA): its update is not s B A; FW-LoRA needs plain LoRA")
        layers[name] = module
    if not layers:
        raise FWLoRAError(
            "the model has no LoRA-adapted linear layer: wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    return layers


class GradientHooks:
    """Forward hooks on LoRA layers that hand (layer name, input x, output gradient g) to `fold` during the
    backward pass of every forward pass run while `measuring()` is true. Autograd's weight gradients are
    never touched: dL/dW = sum_tokens g x^T is formed (or sketched) by `fold` alone. Shared by FW-LoRA
    and fwrank (allocation.py)."""

    def __init__(self, layers: dict[str, nn.Module], measuring: Any, fold: Any):
        self.layers, self.measuring, self.fold = layers, measuring, fold
        self._handles: list[Any] = []

    def attach(self) -> None:
        if not self._handles:
            self._handles = [layer.register_forward_hook(self._hook(name, layer)) for name, layer in self.layers.items()]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, layer: nn.Module):
        # Hooked on the LoRA layer, not its frozen base: the base output needs no grad when nothing
        # upstream does (the first layer), while the layer's output always does; both get the same g.
        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad and self.measuring()):
                return
            if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
                return
            x = inputs[0].detach()
            output.register_hook(lambda g: self.fold(name, x, g))

        return forward_hook


class FisherWeightedLoRA:
    """FW-LoRA on a PEFT LoRA model: Fisher warm-up, then the Fisher-weighted penalty.

    Usage, once per optimizer step (any number of backward passes in between):
        loss = task_loss + fw.penalty()   # a zero tensor during warm-up
        loss.backward()
        fw.step()                         # after backward, before zero_grad
    """

    def __init__(self, model: nn.Module, config: FWLoRAConfig | None = None, adapter_name: str | None = None):
        self.config = config or FWLoRAConfig()
        self.model = model
        self.layers = find_lora_layers(model)
        self.names = list(self.layers)
        first = next(iter(self.layers.values()))
        self.adapter_name = adapter_name or _single_active_adapter(first)
        for name, layer in self.layers.items():
            if self.adapter_name not in layer.lora_A:
                raise FWLoRAError(f"{name} has no LoRA adapter named {self.adapter_name!r}")
        self.device = first.lora_A[self.adapter_name].weight.device
        stat_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.steps_done = 0
        self._fisher = torch.zeros(len(self.names), dtype=stat_dtype, device=self.device)
        # first step at which a layer's statistic was not finite, per layer (-1: none); kept on the device
        self._first_nonfinite = torch.full((len(self.names),), -1, dtype=torch.long, device=self.device)
        self._importance: torch.Tensor | None = None
        self._groups: list[tuple[list[int], torch.Tensor]] = []  # (layer indices, (1 - I_m) s_m^2)
        self._acc: dict[str, torch.Tensor] = {}
        self._omega: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._hooks = GradientHooks(self.layers, self._measuring, self._accumulate)
        self._attach_hooks()

    # ---- warm-up: measuring ||dL/dW_m||^2 -------------------------------------------------------

    @property
    def in_warmup(self) -> bool:
        return self.steps_done < self.config.warmup_steps

    def _measuring(self) -> bool:
        """Whether the current step (steps_done + 1) is a measured warm-up step."""
        return self.in_warmup and self.steps_done % self.config.measure_every == 0

    def _attach_hooks(self) -> None:
        if self.in_warmup:
            self._hooks.attach()

    def _detach_hooks(self) -> None:
        self._hooks.detach()

    def _accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """Fold one micro-batch's piece of dL/dW (= sum_tokens g x^T) into the layer's accumulator."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, even under bf16/fp16
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (tokens, d_in)
        g2 = g.detach().reshape(-1, g.shape[-1]).to(dtype)  # (tokens, d_out)
        if self.config.estimator == "exact":
            if g2.device.type == "cpu":
                # Tokens whose output gradient is exactly zero (padding: no query attends to them, no loss
                # reads them) add nothing to sum g x^T; dropping them is exact and, on padded batches,
                # halves the product. Not on accelerators (a data-dependent shape is a host sync), nor
                # for the sketch, whose product is cheaper than this scan.
                keep = g2.ne(0).any(dim=1)
                x2, g2 = x2[keep], g2[keep]
            piece = g2.T @ x2  # (d_out, d_in)
        else:
            # (G Omega)^T = (x Omega)^T g: (p, d_out); this order is ~2x faster than g^T (x Omega) in BLAS
            piece = (x2 @ self._sketch_matrix(x2.shape[1], dtype)).T @ g2
        if name in self._acc:
            self._acc[name].add_(piece)
        else:
            self._acc[name] = piece

    def _acc_shape(self, name: str) -> tuple[int, int]:
        layer = self.layers[name]
        if self.config.estimator == "exact":
            return (layer.out_features, layer.in_features)
        return (self.config.sketch_size, layer.out_features)

    def _sketch_matrix(self, d_in: int, dtype: torch.dtype) -> torch.Tensor:
        """Omega (d_in x p) for this step: seeded by (seed, step) so every process and a resumed run agree."""
        key = (d_in, dtype)
        if key not in self._omega:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(self.config.seed * 1_000_003 + self.steps_done * 7919 + d_in)
            self._omega[key] = torch.randn(d_in, self.config.sketch_size, generator=gen, device=self.device, dtype=dtype)
        return self._omega[key]

    def step(self, grad_scale: float | torch.Tensor | None = None) -> None:
        """Close one optimizer step: fold the step's gradient norms into F; at step K freeze F and set I.

        grad_scale: the loss scale of a torch.amp.GradScaler (scaler.get_scale()), if one multiplied the
        loss; the statistic is unscaled by it, and a step whose gradient overflowed is left out of F.
        """
        if self._measuring():
            self._update_fisher(grad_scale)
        self._acc.clear()
        self._omega.clear()
        self.steps_done += 1
        if self.steps_done == self.config.warmup_steps:
            self._finish_warmup()

    def _update_fisher(self, grad_scale: float | torch.Tensor | None) -> None:
        if not self._acc:
            raise FWLoRAError(
                f"step {self.steps_done + 1}: no gradient reached any adapted layer during warm-up; "
                "call fw.step() once per optimizer step, after loss.backward()"
            )
        ref = next(iter(self._acc.values()))
        pieces = [self._acc.get(n) for n in self.names]
        # a layer the loss did not reach this step has gradient 0 (and every process must send the same shapes)
        pieces = [torch.zeros(self._acc_shape(n), dtype=ref.dtype, device=ref.device) if p is None else p
                  for n, p in zip(self.names, pieces)]
        _average_over_processes(pieces)
        sq_norms = torch.stack([p.square().sum(dtype=self._fisher.dtype) for p in pieces])
        if self.config.estimator == "sketch":
            sq_norms = sq_norms / self.config.sketch_size
        if grad_scale is not None:
            scale = torch.as_tensor(grad_scale, dtype=self._fisher.dtype, device=self.device)
            sq_norms = sq_norms / scale.square()
            if not bool(torch.isfinite(sq_norms).all()):  # the scaler skips this step; so does F
                return
        step = self.steps_done + 1
        bad = ~torch.isfinite(sq_norms) & (self._first_nonfinite < 0)
        self._first_nonfinite = torch.where(bad, torch.full_like(self._first_nonfinite, step), self._first_nonfinite)
        decay = self.config.beta**self.config.measure_every
        self._fisher.mul_(decay).add_(sq_norms, alpha=1.0 - decay)

    def _finish_warmup(self) -> None:
        self._detach_hooks()
        self._check_fisher()
        fisher = self._fisher
        norm = {"sum": fisher.sum, "max": fisher.max, "mean": fisher.mean}[self.config.normalization]()
        self._importance = fisher / norm
        self._build_penalty()

    def penalty_weights(self) -> torch.Tensor:
        """w_m of the penalty lambda sum_m w_m ||dW_m||^2: 1 - I_m ('sum', 'max') or I_m^-gamma ('mean', where
        I_m = F_m / mean F; a matrix without signal gets the largest finite weight among the others)."""
        imp = self._importance.double()
        if self.config.normalization != "mean":
            return 1.0 - imp
        weights = imp.clamp_min(torch.finfo(torch.float64).tiny).pow(-self.config.gamma)
        finite = weights[(imp > 0)]
        return torch.where(imp > 0, weights, finite.max() if finite.numel() else torch.ones_like(weights))

    def _check_fisher(self) -> None:
        first_bad = self._first_nonfinite.tolist()
        for name, step in zip(self.names, first_bad):
            if step >= 0:
                raise NonFiniteFisherError(f"the Fisher score of {name} became non-finite at step {step} "
                                           "(a NaN/inf gradient in the warm-up)")
        if not bool((self._fisher > 0).any()):
            raise FWLoRAError(
                f"all Fisher scores are zero after {self.steps_done} warm-up steps: no gradient reached the adapted "
                "layers (are they in the forward path, and does the loss depend on them?)"
            )

    # ---- after warm-up: the penalty ---------------------------------------------------------------

    def _build_penalty(self) -> None:
        """Group layers of equal adapter shape so the penalty is a few batched ops, not one per layer."""
        scalings = torch.tensor([float(self.layers[n].scaling[self.adapter_name]) for n in self.names], dtype=torch.float64)
        # w_m s_m^2 per layer: ||s B A||^2 = s^2 ||B A||^2
        weights = self.penalty_weights().cpu() * scalings.double().square()
        groups: dict[tuple, list[int]] = {}
        for i, name in enumerate(self.names):
            a, b = self._adapter_weights(name)
            groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(i)
        self._groups = [(idx, weights[idx].to(self.device)) for idx in groups.values()]

    def _adapter_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[name]
        return layer.lora_A[self.adapter_name].weight, layer.lora_B[self.adapter_name].weight

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
        return {
            "steps_done": self.steps_done,
            "names": list(self.names),
            "config": asdict(self.config),
            "fisher": self._fisher.detach().clone(),
            "first_nonfinite": self._first_nonfinite.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise FWLoRAError("saved FW-LoRA state belongs to a model with other adapted layers")
        if state["config"] != asdict(self.config):
            raise FWLoRAError(f"saved FW-LoRA state has config {state['config']}, this run has {asdict(self.config)}")
        self._detach_hooks()
        self.steps_done = int(state["steps_done"])
        self._fisher = state["fisher"].to(self.device, self._fisher.dtype).clone()
        self._first_nonfinite = state["first_nonfinite"].to(self.device).clone()
        self._importance = None
        self._acc.clear()
        if self.in_warmup:
            self._attach_hooks()
        else:
            self._finish_warmup()

    def save(self, directory: str | Path) -> Path:
        """Write the state as safetensors beside a PEFT adapter (no pickle)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        meta = {k: json.dumps(state[k]) for k in ("steps_done", "names", "config")}
        path = Path(directory) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"fisher": state["fisher"].cpu(), "first_nonfinite": state["first_nonfinite"].cpu()}, str(tmp), meta)
        tmp.replace(path)
        return path

    def load(self, directory: str | Path) -> None:
        from safetensors import safe_open

        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FWLoRAError(f"no FW-LoRA state at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            state = {k: json.loads(meta[k]) for k in ("steps_done", "names", "config")}
            state.update({k: f.get_tensor(k) for k in ("fisher", "first_nonfinite")})
        self.load_state_dict(state)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> "FisherWeightedLoRA":
        """Rebuild FW-LoRA from a directory written by save(), for a model carrying the same adapter."""
        from safetensors import safe_open

        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise FWLoRAError(f"no FW-LoRA state at {path}")
        with safe_open(str(path), framework="pt") as f:
            config = FWLoRAConfig(**json.loads(f.metadata()["config"]))
        fw = cls(model, config)
        fw.load(directory)
        return fw

    def remove(self) -> None:
        """Detach the hooks (the model is left as it was)."""
        self._detach_hooks()


def _single_active_adapter(layer: nn.Module) -> str:
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise FWLoRAError(f"FW-LoRA needs exactly one active LoRA adapter, found {active}: pass adapter_name=")
    return active[0]


def _average_over_processes(tensors: list[torch.Tensor]) -> None:
    """Average in place over data-parallel processes, as DDP averages gradients (one all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
