"""LoRA-One's math (Zhang, Liu & Chen, ICML 2025, "One-step full gradient suffices for low-rank fine-tuning,
provably and efficiently", Algorithm 1 and the authors' code), in PEFT's orientation (B: d_out x r,
A: r x d_in, dW = s B A).

Spectral initialisation from the full-batch gradient G of the pretrained W: with U S V^T the SVD of -G,

    B0 = U_r S_r^1/2 / sqrt(gamma sigma_1),   A0 = S_r^1/2 V_r^T / sqrt(gamma sigma_1)

so that B0 A0 = [-G]_r / (gamma sigma_1): the best rank-r approximation of one full gradient-descent step,
normalised by its largest singular value (the authors' "stable" scale: the initial update's spectral norm is
s / gamma whatever the loss's scale). W is kept as it is (LoRA-One does not subtract B0 A0 from W: the model
starts one projected gradient step away from the pretrained one).

Preconditioned updates (the paper's second half, optional here): the gradients of A and B are multiplied by
(B^T B + eps I)^-1 and (A A^T + eps I)^-1 (the Riemannian / scaled-GD preconditioner of Zhang & Pilanci, 2024)
before the optimizer sees them.

Depends on torch only.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def spectral_init(grad: torch.Tensor, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B0 (d_out x k), A0 (k x d_in), share of ||G||_F^2 in the top k) for k = min(rank, numerical rank of G);
    k = 0 where G is zero (no gradient reached the matrix)."""
    u, s, vh = torch.linalg.svd(-grad, full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return grad.new_zeros(grad.shape[0], 0), grad.new_zeros(0, grad.shape[1]), 0.0
    tol = s[0] * max(grad.shape) * torch.finfo(s.dtype).eps  # as torch.linalg.matrix_rank
    k = min(int(rank), int((s > tol).sum()))
    root = (s[:k] / (gamma * s[0])).sqrt()
    captured = float((s[:k] ** 2).sum() / (s ** 2).sum())
    return u[:, :k] * root, root[:, None] * vh[:k], captured


@torch.no_grad()
def precondition_(a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor | None, grad_b: torch.Tensor | None,
                  eps: float) -> None:
    """In place: grad_A <- (B^T B + eps I)^-1 grad_A, grad_B <- grad_B (A A^T + eps I)^-1 (r x r solves in
    at least float32)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    eye = torch.eye(a.shape[0], dtype=dtype, device=a.device)
    if grad_a is not None:
        bb = b.to(dtype).T @ b.to(dtype) + eps * eye
        grad_a.copy_(torch.linalg.solve(bb, grad_a.to(dtype)))
    if grad_b is not None:
        aa = a.to(dtype) @ a.to(dtype).T + eps * eye
        grad_b.copy_(torch.linalg.solve(aa, grad_b.to(dtype).T).T)  # aa is symmetric: (aa^-1 g^T)^T = g aa^-1
