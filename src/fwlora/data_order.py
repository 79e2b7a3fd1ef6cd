"""The order in which a run sees its examples: training by a seeded permutation per epoch, evaluation by
length."""

from __future__ import annotations

import torch


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch) alone: the same order for every method, and
    a resumed run can rebuild any epoch's order without replaying the ones before."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def length_order(examples: list[dict]) -> list[int]:
    """Evaluation order: longest first, so that each batch pads little (ties keep their order). Metrics are
    sums over examples, so the order cannot change them; predictions are put back in file order."""
    return sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
