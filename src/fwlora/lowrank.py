"""The SVD of a low-rank update dW = s B A without forming dW (d_out x d_in).

dW has rank at most r (B: d_out x r, A: r x d_in). With B = Q_B R_B and A^T = Q_A R_A (thin QR),
dW = Q_B (s R_B R_A^T) Q_A^T, so the r x r core's SVD U' S V'^T gives dW's nonzero spectrum S with
U = Q_B U', V = Q_A V': O((d_out + d_in) r^2) instead of a dense SVD's O(d_out d_in min(d_out, d_in)).
The resize (ranks.py), the rank rules' spectra and the end-of-run analysis all take it from here.
Depends on torch and peft only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def lowrank_svd(b: torch.Tensor, a: torch.Tensor,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (d_out, k), S (k,), Vh (k, d_in) of dW = scale B A in float64, k = min(r, d_out, d_in), largest first:
    torch.linalg.svd(dW, full_matrices=False) cut to its first k components (dW's other singular values are 0).
    Runs where b and a are (a GPU's float64 QR of a d x r matrix is cheap)."""
    q_b, r_b = torch.linalg.qr(b.detach().double())  # (d_out, k_b), (k_b, r)
    q_a, r_a = torch.linalg.qr(a.detach().double().T)  # (d_in, k_a), (k_a, r)
    u, s, vh = torch.linalg.svd(float(scale) * (r_b @ r_a.T), full_matrices=False)  # (k_b, k), (k,), (k, k_a)
    return q_b @ u, s, vh @ q_a.T


@dataclass(frozen=True)
class LowRank:
    """dW = scale * b @ a, kept as its factors: b (d_out, r), a (r, d_in)."""

    b: torch.Tensor
    a: torch.Tensor
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.b.shape[0]), int(self.a.shape[1])

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return lowrank_svd(self.b, self.a, self.scale)

    def singular_values(self) -> torch.Tensor:
        return self.svd()[1]

    def dense(self) -> torch.Tensor:
        """dW itself, float64 (for checks and small matrices only)."""
        return float(self.scale) * (self.b.detach().double() @ self.a.detach().double())

    def __sub__(self, other: "LowRank | torch.Tensor") -> "LowRank | torch.Tensor":
        """dW - other: low-rank still (rank <= r + r', factors side by side) for another LowRank, such as an update
        measured from a non-zero start s0 B0 A0; dense (float64) for a dense tensor."""
        if isinstance(other, LowRank):
            b = torch.cat([float(self.scale) * self.b.double(), -float(other.scale) * other.b.double()], dim=1)
            return LowRank(b, torch.cat([self.a.double(), other.a.double()], dim=0))
        return self.dense() - other

    def cpu(self) -> "LowRank":
        return LowRank(self.b.detach().cpu(), self.a.detach().cpu(), self.scale)


def lora_delta(layer: nn.Module, adapter: str) -> LowRank:
    """A LoRA layer's own update s B A (its lora_A / lora_B linears and scaling; fan_in_fan_out not applied)."""
    return LowRank(layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, float(layer.scaling[adapter]))


__all__ = ["LowRank", "lora_delta", "lowrank_svd"]
