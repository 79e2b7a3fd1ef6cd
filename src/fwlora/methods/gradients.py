"""The warm-up statistic both adaptive methods measure (FW-LoRA's Fisher scores, fwrank's gradient spectra).

For a LoRA-adapted linear layer y = x W^T, the gradient of the loss with respect to the frozen weight is
G = dL/dW = sum_tokens g x^T (g = dL/dy). A forward hook on each LoRA layer keeps its input x and hangs a
tensor hook on its output y that receives g in the backward pass; the hook folds each micro-batch into a
per-layer accumulator, never touching autograd's weight gradients. Once per optimizer step, `step()`
averages the accumulators over data-parallel processes (as DDP averages gradients) and only then hands
them to the method, so the statistic is that of the global batch the optimizer step sees, however the
batch is split into micro-batches or processes.

What is accumulated per layer (d_in, d_out: the layer's sizes; p: sketch_size; Omega: a Gaussian matrix
drawn afresh each step from (seed, step, size), the same on every process and in a resumed run):
    side "input"    sketch  (G Omega)^T  = (x Omega)^T g     (p, d_out), Omega d_in x p     (FW-LoRA)
                    exact   G                                 (d_out, d_in)
    side "smaller"  the smaller of d_in, d_out is kept: as above where d_out <= d_in, else     (fwrank)
                    sketch  Omega'^T G   = (g Omega')^T x     (p, d_in), Omega' d_out x p
                    exact   G^T where d_out <= d_in, else G
E ||G Omega||_F^2 = p ||G||_F^2 and E[Y^T Y] / p = G G^T for Y = (G Omega)^T: the sketch is unbiased for
the squared norm and the second moment, and linear in G, so it is exact under accumulation and DDP too.
`measure_every = k` measures one warm-up step in k (the methods' EMAs then decay by beta^k per measured
step, so they span the same steps).

This file depends on torch, peft and fwlora.errors only: copy it with one method's folder to have that
method in another project.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from fwlora.errors import FWLoRAError, MethodError

DEFAULT_MEASURE_EVERY = 8


def is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_fraction(v: Any) -> bool:
    """A warm-up given as a fraction of the run (0.25), not as a count of steps."""
    return isinstance(v, float) and 0.0 < v < 1.0


# ---- the settings both methods share -------------------------------------------------------------------

@dataclass(kw_only=True)
class WarmupConfig:
    """The warm-up statistic's settings, shared by FWLoRAConfig and FWRankConfig (one definition, one check)."""

    warmup_steps: int | float = field(default=500, metadata={
        "help": "K: optimizer steps measured in the warm-up; a number in (0, 1) is a fraction of the run's steps"})
    beta: float = field(default=0.98, metadata={"help": "EMA factor of the warm-up statistic, in (0, 1)"})
    sketch_size: int = field(default=8, metadata={
        "help": "p: columns of the Gaussian sketch of each layer's gradient (0: the exact gradient, fwrank only)"})
    measure_every: int | None = field(default=None, metadata={
        "help": "measure one warm-up step in this many (the EMA then decays by beta^k); default min(8, K), which "
                "keeps the warm-up at LoRA's cost; 1 = every step"})
    seed: int = field(default=0, metadata={"help": "seed of the sketch matrices"})

    def __post_init__(self) -> None:
        fraction = is_fraction(self.warmup_steps)
        if not fraction and (not is_int(self.warmup_steps) or self.warmup_steps < 1):
            raise self.bad("warmup_steps", "must be >= 1 (an integer: the statistic needs at least one step), or a "
                                           "fraction of the run in (0, 1)")
        if not is_real(self.beta) or not 0.0 < self.beta < 1.0:
            raise self.bad("beta", "must lie strictly between 0 and 1")
        if not is_int(self.sketch_size) or self.sketch_size < 0:
            raise self.bad("sketch_size", "must be an integer >= 0 (0: exact)")
        if self.measure_every is None and not fraction:
            self.measure_every = min(DEFAULT_MEASURE_EVERY, self.warmup_steps)
        if self.measure_every is not None and (not is_int(self.measure_every) or self.measure_every < 1
                                               or (not fraction and self.measure_every > self.warmup_steps)):
            raise self.bad("measure_every", f"must be an integer in [1, warmup_steps={self.warmup_steps}]")
        if not is_int(self.seed):
            raise self.bad("seed", "must be an integer")

    def bad(self, name: str, why: str) -> MethodError:
        return MethodError(f"{type(self).__name__}.{name} = {getattr(self, name)!r}: {why}")

    def resolve(self, total_steps: int | None):
        """This config with K counted in optimizer steps: a fraction becomes max(1, round(fraction * total_steps))."""
        if not is_fraction(self.warmup_steps):
            return self
        if total_steps is None:
            raise MethodError(f"{type(self).__name__}.warmup_steps = {self.warmup_steps} is a fraction of the run: pass "
                              "total_steps= (the run's optimizer steps) so that K can be counted")
        return replace(self, warmup_steps=max(1, round(self.warmup_steps * total_steps)))


def matches_saved(config: WarmupConfig, saved: dict[str, Any]) -> bool:
    """Whether a saved (resolved) config is this one, K aside where this one gives K as a fraction."""
    mine = asdict(config)
    if is_fraction(config.warmup_steps):
        mine = {k: v for k, v in mine.items() if k not in ("warmup_steps", "measure_every") or v is not None}
        mine.pop("warmup_steps")
        saved = {k: v for k, v in saved.items() if k in mine}
    return mine == saved


def check_reachable(warmup_steps: int, total_steps: int | None, what: str) -> None:
    """Refuse a K the run can never reach, before training starts."""
    if total_steps is not None and total_steps > 0 and warmup_steps >= total_steps:
        raise MethodError(f"warmup_steps = {warmup_steps} >= the run's {total_steps} optimizer steps: {what} would "
                          "never happen; lower warmup_steps (or give a fraction of the run, e.g. 0.25)")


# ---- finding the layers ----------------------------------------------------------------------------

def find_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA-adapted linear layer of a PEFT LoRA model, by name in model.named_modules().

    Layers inside a modules_to_save wrapper (the task head) are left out. An AdaLoRA model, a model without
    LoRA layers, LoRA variants (DoRA) and LoRA on non-linear layers are refused with a message. A quantized
    base layer (bitsandbytes 4-/8-bit, QLoRA) is accepted: the statistic needs only its input and output.
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
            raise MethodError(f"{name} is an AdaLoRA layer: AdaLoRA allocates rank by itself; FW-LoRA and fwrank "
                              "apply to plain LoRA models")
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # the task head: trained in full, not part of the adapter budget
        if not is_linear(module.get_base_layer()):
            raise MethodError(f"{name} adapts a {type(module.get_base_layer()).__name__}: LoRA on linear layers only; "
                              "leave this module out of target_modules")
        if getattr(module, "lora_variant", None):
            raise MethodError(f"{name} uses a LoRA variant (e.g. DoRA): its update is not s B A; plain LoRA is needed")
        layers[name] = module
    if not layers:
        raise MethodError("the model has no LoRA-adapted linear layer: wrap it with peft.get_peft_model(model, "
                          "LoraConfig(...)) first")
    return layers


def is_linear(base: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D, or a quantized linear layer (bitsandbytes Linear4bit / Linear8bitLt)."""
    return isinstance(base, nn.Linear) or type(base).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def single_active_adapter(layer: nn.Module) -> str:
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise MethodError(f"exactly one active LoRA adapter is needed, found {active}: pass adapter_name=")
    return active[0]


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a LoRA layer, from its adapter (a quantized base packs its weight)."""
    return int(layer.in_features), int(layer.out_features)


# ---- hooks and the statistic -------------------------------------------------------------------------

class GradientHooks:
    """Forward hooks on LoRA layers that hand (layer name, input x, output gradient g) to `fold` during the
    backward pass of every forward pass run while `measuring()` is true."""

    def __init__(self, layers: dict[str, nn.Module], measuring: Callable[[], bool],
                 fold: Callable[[str, torch.Tensor, torch.Tensor], None]):
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


class GradientStatistic:
    """The measuring half of a warm-up: hooks, accumulators, the sketch, the step count and the reduction.

    The method gives the layers, the settings (K resolved to steps), which side to keep ("input" or
    "smaller"), the sketch size (0: exact) and `fold(pieces, grad_scale)`, called once per measured
    optimizer step with one accumulator per layer (in the layers' order, zero where no gradient reached a
    layer, averaged over processes). `step()` closes each optimizer step and returns True on the step that
    ends the warm-up; the hooks are detached then.
    """

    def __init__(self, layers: dict[str, nn.Module], config: WarmupConfig, fold: Callable[..., None],
                 device: torch.device, side: str = "input", sketch_size: int | None = None, fresh_sketch: bool = True):
        if side not in ("input", "smaller"):
            raise ValueError(f"side must be 'input' or 'smaller', got {side!r}")
        if is_fraction(config.warmup_steps):
            raise MethodError(f"{type(config).__name__}.warmup_steps = {config.warmup_steps} is a fraction of the run: "
                              "pass total_steps= to the method so that K can be counted")
        self.layers, self.config, self.fold, self.side = layers, config, fold, side
        self.names = list(layers)
        self.dims = {n: layer_dims(m) for n, m in layers.items()}
        self.sketch_size = config.sketch_size if sketch_size is None else sketch_size
        self.fresh_sketch = fresh_sketch  # False: one Omega for the whole warm-up (an average of G, not of G G^T)
        self.device = device
        self.steps_done = 0  # optimizer steps closed
        self._acc: dict[str, torch.Tensor] = {}
        self._omega: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self.hooks = GradientHooks(layers, self.measuring, self.accumulate)
        self.hooks.attach()

    @property
    def in_warmup(self) -> bool:
        return self.steps_done < self.config.warmup_steps

    def measuring(self) -> bool:
        """Whether the current step (steps_done + 1) is a measured warm-up step."""
        return self.in_warmup and self.steps_done % self.config.measure_every == 0

    @property
    def decay(self) -> float:
        """The EMA's decay per measured step: beta^measure_every."""
        return self.config.beta ** self.config.measure_every

    def keeps_output_side(self, name: str) -> bool:
        d_in, d_out = self.dims[name]
        return self.side == "input" or d_out <= d_in

    def piece_shape(self, name: str) -> tuple[int, int]:
        d_in, d_out = self.dims[name]
        out_side = self.keeps_output_side(name)
        if self.sketch_size == 0:
            if self.side == "input":
                return (d_out, d_in)
            return (d_in, d_out) if out_side else (d_out, d_in)
        return (self.sketch_size, d_out if out_side else d_in)

    def accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """Fold one micro-batch's piece of dL/dW = sum_tokens g x^T into the layer's accumulator."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, even under bf16/fp16
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (tokens, d_in)
        g2 = g.detach().reshape(-1, g.shape[-1]).to(dtype)  # (tokens, d_out)
        out_side = self.side == "input" or x2.shape[1] >= g2.shape[1]
        if self.sketch_size == 0:
            if g2.device.type == "cpu":
                # Tokens whose output gradient is exactly zero (padding: no query attends to them, no loss
                # reads them) add nothing to sum g x^T; dropping them is exact and, on padded batches, halves
                # the product. Not on accelerators (a data-dependent shape is a host sync), nor for the
                # sketch, whose product is cheaper than this scan.
                keep = g2.ne(0).any(dim=1)
                x2, g2 = x2[keep], g2[keep]
            if self.side == "input":
                piece = g2.T @ x2  # G: (d_out, d_in)
            else:
                piece = x2.T @ g2 if out_side else g2.T @ x2  # G^T (d_in, d_out) or G (d_out, d_in)
        elif out_side:
            # (G Omega)^T = (x Omega)^T g: (p, d_out); this order is ~2x faster than g^T (x Omega) in BLAS
            piece = (x2 @ self.sketch(x2.shape[1], dtype)).T @ g2
        else:
            piece = (g2 @ self.sketch(g2.shape[1], dtype)).T @ x2  # Omega'^T G: (p, d_in)
        if name in self._acc:
            self._acc[name].add_(piece)
        else:
            self._acc[name] = piece

    def sketch(self, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Omega (dim x p) for this step: seeded by (seed, step, dim), so every process and a resumed run agree
        (by (seed, dim) alone when the sketch is not fresh)."""
        key = (dim, dtype)
        if key not in self._omega:
            gen = torch.Generator(device=self.device)
            step = self.steps_done if self.fresh_sketch else 999_983  # a step no warm-up reaches
            gen.manual_seed(self.config.seed * 1_000_003 + step * 7919 + dim)
            self._omega[key] = torch.randn(dim, self.sketch_size, generator=gen, device=self.device, dtype=dtype)
        return self._omega[key]

    def step(self, grad_scale: float | torch.Tensor | None = None) -> bool:
        """Close one optimizer step (after its last backward pass); True on the step that ends the warm-up.

        grad_scale: a GradScaler's scale (scaler.get_scale()) if one multiplied the loss; the method's fold
        divides it out and leaves out a step whose gradient overflowed.
        """
        if not self.in_warmup:
            self.steps_done += 1  # steps closed, warm-up or not
            return False
        if self.measuring():
            self.fold(self._reduced_pieces(), grad_scale)
        self._acc.clear()
        if self.fresh_sketch:
            self._omega.clear()
        self.steps_done += 1
        if self.in_warmup:
            return False
        self.hooks.detach()
        return True

    def _reduced_pieces(self) -> list[torch.Tensor]:
        if not self._acc:
            raise MethodError(f"step {self.steps_done + 1}: no gradient reached any adapted layer during the warm-up; "
                              "call step() once per optimizer step, after loss.backward()")
        ref = next(iter(self._acc.values()))
        # a layer the loss did not reach this step has gradient 0 (and every process must send the same shapes)
        pieces = [self._acc[n] if n in self._acc else torch.zeros(self.piece_shape(n), dtype=ref.dtype, device=ref.device)
                  for n in self.names]
        average_over_processes(pieces)
        return pieces

    def restore(self, steps_done: int) -> None:
        """Continue from a saved step count: hooks attached while the warm-up goes on, detached after it."""
        self.steps_done = int(steps_done)
        self._acc.clear()
        self._omega.clear()
        if self.in_warmup:
            self.hooks.attach()
        else:
            self.hooks.detach()

    def remove(self) -> None:
        self.hooks.detach()


def save_state_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """A method's state as safetensors (its tensors) plus JSON metadata, written aside and renamed into place
    (no pickle; a reader never sees half a file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()} or {"empty": torch.zeros(0)}, str(tmp),
              {k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)
    return path


def read_state_file(path: Path, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file written by save_state_file."""
    from safetensors import safe_open

    if not path.is_file():
        raise MethodError(f"no {what} state at {path}")
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}, {k: f.get_tensor(k) for k in f.keys()}


def average_over_processes(tensors: list[torch.Tensor]) -> None:
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


def same_on_every_process(values: dict[str, int], device: torch.device) -> dict[str, int]:
    """Take process 0's integers everywhere (an eigendecomposition may differ in the last bit across devices)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return dict(zip(values, t.tolist()))


def stat_dtype(device: torch.device) -> torch.dtype:
    """float64 for the statistic where the device has it (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


__all__ = ["DEFAULT_MEASURE_EVERY", "FWLoRAError", "GradientHooks", "GradientStatistic", "WarmupConfig",
           "average_over_processes", "check_reachable", "find_lora_layers", "is_fraction", "is_int", "is_linear",
           "is_real", "layer_dims", "same_on_every_process", "single_active_adapter", "stat_dtype"]
