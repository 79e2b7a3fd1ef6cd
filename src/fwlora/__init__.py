"""fwlora: Fisher-Weighted LoRA for PEFT models.

    from fwlora import FWLoRAConfig, FisherWeightedLoRA
    fw = FisherWeightedLoRA(peft_model, FWLoRAConfig(lambda_fw=1e-4, warmup_steps=500, beta=0.98))
    loss = model(**batch).loss + fw.penalty(); loss.backward(); fw.step(); optimizer.step(); ...

With the Hugging Face Trainer: `FWLoRATrainer` (or `FWLoRACallback`) from fwlora.hf.
"""

from fwlora.method import FisherWeightedLoRA, FWLoRAConfig, FWLoRAError, delta_weight_sq_norm, find_lora_layers

__all__ = ["FWLoRAConfig", "FisherWeightedLoRA", "FWLoRAError", "delta_weight_sq_norm", "find_lora_layers",
           "FWLoRACallback", "FWLoRATrainer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the Trainer integration imports transformers' Trainer: load it only when asked for
    if name in ("FWLoRACallback", "FWLoRATrainer"):
        from fwlora import hf

        return getattr(hf, name)
    raise AttributeError(name)
