"""fwlora: Fisher-Weighted LoRA and Fisher-guided rank allocation (fwrank) for PEFT models.

    from fwlora import FWLoRAConfig, FisherWeightedLoRA
    fw = FisherWeightedLoRA(peft_model, FWLoRAConfig(lambda_fw=1e-4, warmup_steps=500, beta=0.98))
    loss = model(**batch).loss + fw.penalty(); loss.backward(); fw.step(); optimizer.step(); ...

    from fwlora import FWRankConfig, FisherRankAllocation, refresh_optimizer
    fr = FisherRankAllocation(peft_model, FWRankConfig(target_rank=2, warmup_steps=200))
    loss.backward(); optimizer.step()
    if fr.step(): refresh_optimizer(optimizer, peft_model)    # once, at step K: the ranks were reallocated

With the Hugging Face Trainer: `FWLoRATrainer` / `FWRankTrainer` (or the callbacks) from fwlora.hf.
This package imports torch and peft only; the experiment system (fwlora train/bench/report/sweep) needs
the `experiments` extra.
"""

from fwlora.allocation import (FisherRankAllocation, FWRankConfig, allocate_proportional, allocate_spectrum,
                               refresh_optimizer, resize_lora_ranks)
from fwlora.method import (FisherWeightedLoRA, FWLoRAConfig, FWLoRAError, NonFiniteFisherError, delta_weight_sq_norm,
                           find_lora_layers)

__all__ = ["FWLoRAConfig", "FisherWeightedLoRA", "FWLoRAError", "NonFiniteFisherError", "delta_weight_sq_norm",
           "find_lora_layers", "FWRankConfig", "FisherRankAllocation", "refresh_optimizer", "resize_lora_ranks",
           "allocate_proportional", "allocate_spectrum", "FWLoRACallback", "FWLoRATrainer", "FWRankCallback",
           "FWRankTrainer"]
__version__ = "0.2.0"


def __getattr__(name: str):
    # the Trainer integration imports transformers' Trainer: load it only when asked for
    if name in ("FWLoRACallback", "FWLoRATrainer", "FWRankCallback", "FWRankTrainer"):
        from fwlora import hf

        return getattr(hf, name)
    raise AttributeError(name)
