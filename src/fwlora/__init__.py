"""fwlora: Fisher-Weighted LoRA and Fisher-guided rank allocation (fwrank) for PEFT models.

    from fwlora import FWLoRAConfig, FisherWeightedLoRA
    fw = FisherWeightedLoRA(peft_model, FWLoRAConfig(lambda_fw=1e-4, warmup_steps=500, beta=0.98))
    loss = model(**batch).loss + fw.penalty(); loss.backward(); fw.step(); optimizer.step(); ...

    from fwlora import FWRankConfig, FisherRankAllocation, refresh_optimizer
    fr = FisherRankAllocation(peft_model, FWRankConfig(target_rank=2, warmup_steps=200))
    loss.backward(); optimizer.step()
    if fr.step(): refresh_optimizer(optimizer, peft_model)    # once, at step K: the ranks were reallocated

With the Hugging Face Trainer: the callbacks `FWLoRACallback` / `FWRankCallback` (or the Trainer subclasses
built on them) from fwlora.hf. `load_run(run_dir)` gives back what `fwlora train` trained. This package's
face imports torch and peft only; the experiment system (fwlora train/bench/report/sweep) needs the
`experiments` extra.
"""

from importlib.metadata import PackageNotFoundError, version

from fwlora.errors import FWLoRAError, MethodError, NonFiniteFisherError, UserError
from fwlora.methods.fwlora import FisherWeightedLoRA, FWLoRAConfig, delta_weight_sq_norm
from fwlora.methods.fwrank import (FisherRankAllocation, FWRankConfig, allocate_proportional, allocate_spectrum,
                                   refresh_optimizer, resize_lora_ranks)
from fwlora.methods.gradients import find_lora_layers
from fwlora.methods.widecut import WideCut, WideCutConfig

try:  # one source of the version: pyproject.toml, through the installed package's metadata
    __version__ = version(__name__)
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["FWLoRAConfig", "FisherWeightedLoRA", "FWLoRAError", "MethodError", "NonFiniteFisherError", "UserError",
           "delta_weight_sq_norm", "find_lora_layers", "FWRankConfig", "FisherRankAllocation", "refresh_optimizer",
           "resize_lora_ranks", "allocate_proportional", "allocate_spectrum", "FWLoRACallback", "FWLoRATrainer",
           "FWRankCallback", "FWRankTrainer", "WideCut", "WideCutConfig", "load_run"]

_HF = ("FWLoRACallback", "FWLoRATrainer", "FWRankCallback", "FWRankTrainer")


def __getattr__(name: str):
    # the Trainer integration imports transformers' Trainer, load_run the experiment system: only when asked for
    if name in _HF:
        from fwlora import hf

        return getattr(hf, name)
    if name == "load_run":
        from fwlora.inference import load_run

        return load_run
    raise AttributeError(name)
