"""Which layers the warm-up statistic measures: every plain LoRA-adapted linear layer of a PEFT model."""

from __future__ import annotations

from torch import nn

from fwlora.errors import MethodError


def find_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA-adapted linear layer of a PEFT LoRA model, by name in model.named_modules().

    Layers inside a modules_to_save wrapper (the task head) are left out. An AdaLoRA model, a model without
    LoRA layers, LoRA variants (DoRA) and LoRA on non-linear layers are refused with a message. A quantized
    base layer (bitsandbytes 4-/8-bit, QLoRA) is accepted: the statistic needs only its input and output.
    """
    from peft.tuners.adalora.layer import AdaLoraLayer
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrapped = [n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, AdaLoraLayer):
            raise MethodError(f"{name} is an AdaLoRA layer: AdaLoRA allocates rank by itself; FW-LoRA and fwrank "
                              "apply to plain LoRA models")
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # the task head: trained in full, not part of the adapter budget
        if not is_linear(module.get_base_layer()):
            raise MethodError(f"{name} adapts a {type(module.get_base_layer()).__name__}: LoRA on linear layers only; "
                              "leave this module out of target_modules")
        if getattr(module, "lora_variant", None):
            raise MethodError(f"{name} uses a LoRA variant (e.g. DoRA): its update is not s B A; plain LoRA is needed")
        layers[name] = module
    if not layers:
        raise MethodError("the model has no LoRA-adapted linear layer: wrap it with peft.get_peft_model(model, "
                          "LoraConfig(...)) first")
    return layers


def is_linear(base: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D, or a quantized linear layer (bitsandbytes Linear4bit / Linear8bitLt)."""
    return isinstance(base, nn.Linear) or type(base).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def single_active_adapter(layer: nn.Module) -> str:
    active = list(layer.active_adapters)
    if len(active) != 1:
        raise MethodError(f"exactly one active LoRA adapter is needed, found {active}: pass adapter_name=")
    return active[0]


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a LoRA layer, from its adapter (a quantized base packs its weight)."""
    return int(layer.in_features), int(layer.out_features)
