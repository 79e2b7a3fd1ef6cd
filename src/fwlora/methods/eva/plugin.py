"""EVA (Paischer et al. 2024), PEFT's init_lora_weights="eva" with initialize_lora_eva_weights: A0 = the top
right singular vectors of each adapted matrix's inputs (an incremental SVD over training batches, stopped when
the components converge), B0 = 0, and the ranks redistributed by explained variance: the total rank stays
r x (matrices), a matrix gets at most rho r, some none (PEFT then drops its adapter). Adapter parameters
follow the ranks, so they can differ from LoRA's at the same rank (counted as trained, as for every method).

The pass reads the run's first `eva_batches` training batches, cycling through them until the SVD converges
(PEFT cycles over the dataloader it is given), inside the run's timed build. On a classifier the label mask is
off (one label per sequence: every non-padding token counts); on a causal LM PEFT's default (labels = -100 out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from torch import nn

from fwlora.checks import is_int, is_real
from fwlora.errors import bad_setting
from fwlora.methods.base import DataPass, with_help
from fwlora.methods.peft_lora import PeftLoRA, lora_layers
from fwlora.methods.registry import register


@dataclass
class EVASettings:
    rho: float = with_help(2.0, "EVA: a matrix's rank is at most rho r (1: no redistribution)")
    tau: float = with_help(0.99, "EVA: the SVD stops when consecutive components' cosine similarity reaches tau")
    batches: int = with_help(64, "EVA: training batches its SVD cycles through until it converges")
    whiten: bool = with_help(False, "EVA: whiten the singular vectors (PEFT's whiten)")

    def __post_init__(self) -> None:
        if not is_real(self.rho) or not 1 <= self.rho < float("inf"):
            raise bad_setting(self, "rho", "must be a number >= 1")
        if not is_real(self.tau) or not 0 <= self.tau <= 1:
            raise bad_setting(self, "tau", "must lie in [0, 1]")
        if not is_int(self.batches) or self.batches < 1:
            raise bad_setting(self, "batches", "must be an integer >= 1")


class _Batches:
    """The first n batches as the re-iterable, sized loader PEFT's EVA takes."""

    def __init__(self, data: DataPass, n: int):
        self.data, self.n = data, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[dict]:
        return iter(self.data.batches(self.n))


@register
class EVA(PeftLoRA):
    name, label = "eva", "EVA"
    Settings = EVASettings
    prefix = "eva_"
    search_space = {"eva_rho": {"type": "categorical", "choices": [1.0, 2.0]}}
    colour, line_style = "tab:gray", ("-", "<")
    rank_column = "eva_rank"
    figures = ("ranks",)
    uses_data_pass = True

    def config_fields(self) -> dict[str, Any]:
        from peft import EvaConfig

        s = self.settings
        return {"init_lora_weights": "eva",
                "eva_config": EvaConfig(rho=s.rho, tau=s.tau, whiten=s.whiten,
                                        use_label_mask=self.run.task_type == "CAUSAL_LM")}

    def initialise(self, peft_model: nn.Module) -> None:
        from peft import initialize_lora_eva_weights

        data = self.data_pass()
        self.targets = list(lora_layers(peft_model))
        # every process reads the same batches: no gathering (the same SVD on every rank)
        initialize_lora_eva_weights(peft_model, dataloader=_Batches(data, self.settings.batches),
                                    forward_fn=data.loss, show_progress_bar=False, gather_distributed_inputs=False)
        layers = lora_layers(peft_model)
        self.ranks = {n: int(layers[n].r["default"]) if n in layers else 0 for n in self.targets}

    def summary(self) -> dict[str, Any]:
        s = self.settings
        return {**super().summary(), "rho": s.rho, "tau": s.tau, "batches": s.batches, "whiten": s.whiten,
                "final_total_rank": sum(self.ranks.values()),
                "dropped_matrices": sum(r == 0 for r in self.ranks.values()), "ranks": self.ranks}

    def matrix_columns(self) -> dict[str, dict[str, float]]:
        return {"eva_rank": dict(self.ranks)}
