"""The measuring half of a warm-up: per-layer accumulators of dL/dW (exact or sketched), the step count, and
the hand-over to the method once per optimizer step, averaged over processes."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fwlora.checks import is_fraction
from fwlora.errors import MethodError
from fwlora.methods.gradients.distributed import average_over_processes
from fwlora.methods.gradients.hooks import GradientHooks
from fwlora.methods.gradients.layers import layer_dims
from fwlora.methods.gradients.settings import WarmupConfig


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
        pieces = [self._acc[n] if n in self._acc
                  else torch.zeros(self.piece_shape(n), dtype=ref.dtype, device=ref.device) for n in self.names]
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


def stat_dtype(device: torch.device) -> torch.dtype:
    """float64 for the statistic where the device has it (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64
