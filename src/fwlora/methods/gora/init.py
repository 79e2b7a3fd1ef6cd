"""GoRA's initialisation (He et al., NeurIPS 2025, Sec. 3.3 and the authors' code), in PEFT's orientation
(B: d_out x r, A: r x d_in, dW = s B A).

GoRA reads LoRA as a gradient compressor: A stays PEFT's random (Kaiming-uniform) draw and B is the
least-squares fit of the gradient through it, B = G A^T (A A^T)^-1 (so B A = G P_A, P_A the projection onto A's
row space), negated and scaled so that the initial update is one gradient-descent step of size gamma:

    B0 = -(gamma / s) sqrt(d_in / r) G A^T (A A^T)^-1,     s B0 A0 = -gamma sqrt(d_in / r) G P_A

sqrt(d_in / r) undoes the projection's shrinkage (E ||G P_A||_F^2 = (r / d_in) ||G||_F^2 for a random A), so
E ||dW0||_F = gamma ||G||_F, as with the authors' learning-rate-matched scale (gamma plays the step size; the
paper's T5 and Llama settings: 0.05 to 0.08). W is kept as it is (GoRA does not touch the pretrained weights).

Depends on torch only.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def fit_b(grad: torch.Tensor, a: torch.Tensor, gamma: float, scaling: float) -> torch.Tensor:
    """B0 (d_out x r) for the gradient G (d_out x d_in) and A (r x d_in), solved in float64 where the device has
    it (MPS: float32)."""
    dtype = torch.float32 if grad.device.type == "mps" else torch.float64
    a64, g64 = a.to(dtype), grad.to(dtype)
    r, d_in = a.shape
    fit = torch.linalg.solve(a64 @ a64.T, a64 @ g64.T)  # (A A^T)^-1 A G^T: (r, d_out)
    return -(gamma / scaling) * math.sqrt(d_in / r) * fit.T
