"""The statistic across data-parallel processes: averaged as DDP averages gradients, decisions taken once."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
