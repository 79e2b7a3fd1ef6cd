"""FW-LoRA's penalty, pure functions: ||s B A||_F^2 in its r x r Gram form and the weights w_m.

    L_total = L_task + lambda * sum_m w_m ||s_m B_m A_m||_F^2,   w_m = 1 - I_m,   I_m = F_m / sum_m' F_m'
"""

from __future__ import annotations

import torch


def delta_weight_sq_norm(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||s B A||_F^2 = s^2 trace((B^T B)(A A^T)) without forming the d_out x d_in product.

    Works batched: A (..., r, d_in), B (..., d_out, r) give (...). Both Gram matrices are symmetric, so
    the trace of their product is the sum of their elementwise product.
    """
    gram_a = lora_A @ lora_A.transpose(-1, -2)  # (..., r, r)
    gram_b = lora_B.transpose(-1, -2) @ lora_B  # (..., r, r)
    return scaling**2 * (gram_a * gram_b).sum(dim=(-1, -2))


def normalise(fisher: torch.Tensor, normalization: str) -> torch.Tensor:
    """I_m: F_m over the sum ('sum', the method's), the max or the mean of the scores."""
    norm = {"sum": fisher.sum, "max": fisher.max, "mean": fisher.mean}[normalization]()
    return fisher / norm


def penalty_weights(importance: torch.Tensor, normalization: str, gamma: float) -> torch.Tensor:
    """w_m of the penalty lambda sum_m w_m ||dW_m||^2: 1 - I_m ('sum', 'max') or I_m^-gamma ('mean', where
    I_m = F_m / mean F; a matrix without signal gets the largest finite weight among the others)."""
    imp = importance.double()
    if normalization != "mean":
        return 1.0 - imp
    weights = imp.clamp_min(torch.finfo(torch.float64).tiny).pow(-gamma)
    finite = weights[(imp > 0)]
    return torch.where(imp > 0, weights, finite.max() if finite.numel() else torch.ones_like(weights))
