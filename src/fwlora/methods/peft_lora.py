"""What PEFT's LoRA family shares here (rsLoRA, DoRA, PiSSA, OLoRA, LoRA-GA, EVA, LoRA+): a LoRA built from
PEFT's own LoraConfig with one method's fields added (use_rslora, use_dora, init_lora_weights, ...), at plain
LoRA's rank and scaling (alpha = 2 r unless --lora-alpha), and what the initialisations that move a piece of
W into the adapter need to be saved and measured right.

PiSSA, OLoRA and LoRA-GA train on W_res = W - s B0 A0 with B0 A0 != 0 (`ResidualInit`):
- the saved adapter is PEFT's conversion, save_pretrained(path_initial_model_for_weight_conversion=...): a plain
  LoRA of rank 2r on the pretrained W, dW = s (B A - B0 A0) = s [B | -B0] [A ; A0], so that load_run, predict
  and export load it onto the backbone as it is on disk. PEFT's conversion keeps the lora_A / lora_B tensors
  only; the head (modules_to_save) is copied back from the loop's own save beside them.
- the matrix table's dW is that same update, not s B A.

Depends on torch, peft, fwlora.errors, the method interface and methods/lowrank.py only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from fwlora.methods.base import Method, lora_config, short_name
from fwlora.methods.lora import default_alpha
from fwlora.lowrank import LowRank
from fwlora.methods.deltas import peft_delta

WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's SAFETENSORS_WEIGHTS_NAME


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers of a model, by short module name."""
    from peft.tuners.lora import LoraLayer

    return {short_name(n): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


class PeftLoRA(Method):
    """LoRA from PEFT's LoraConfig plus `config_fields()`. Subclasses add PEFT's own steps around
    get_peft_model: `prepare` (before it, on the base model: LoRA-GA's gradient pass) and `initialise` (after
    it: EVA's SVD pass)."""

    time_hypothesis = None  # no claim on time: the report shows the ratios
    ships_with = "peft"

    def config_fields(self) -> dict[str, Any]:
        return {}

    def lora_config(self) -> Any:
        """PEFT's LoraConfig of this run (and self.lora_alpha, the scaling's alpha)."""
        self.lora_alpha = self.run.lora_alpha or default_alpha(self.run.rank)
        return lora_config(self.run, self.run.rank, self.lora_alpha, **self.config_fields())

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        config = self.lora_config()
        self.prepare(model, config)
        peft_model = get_peft_model(model, config)
        self.initialise(peft_model)
        return peft_model

    def prepare(self, model: nn.Module, config: Any) -> None:
        """PEFT's preprocessing of the base model, before get_peft_model."""

    def initialise(self, peft_model: nn.Module) -> None:
        """PEFT's initialisation of the built model, after get_peft_model."""

    def summary(self) -> dict[str, Any]:
        return {"lora_alpha": self.lora_alpha}


class ResidualInit(PeftLoRA):
    """An initialisation that moves s B0 A0 out of W into the adapter (see the module docstring)."""

    timed_init = True  # an SVD or QR of every adapted weight (LoRA-GA: a data pass too)
    refuses_quantized = ("PEFT initialises it from the float weight and would re-quantise the residual W - s B0 A0, "
                         "which a saved run could not load back exactly")

    def attach(self, peft_model: nn.Module) -> None:
        super().attach(peft_model)
        # PEFT's recipe: the initial adapter saved as a plain LoRA, before any training step
        self._initial = tempfile.TemporaryDirectory(prefix="fwlora-initial-")
        self.initial_dir = Path(self._initial.name) / "initial"
        config = peft_model.peft_config["default"]
        init, config.init_lora_weights = config.init_lora_weights, True
        try:
            peft_model.save_pretrained(str(self.initial_dir))
        finally:
            config.init_lora_weights = init
        # s B0 A0 per matrix as PEFT's get_delta_weight has it, in factors (a copy: training moves B and A)
        self.start = {}
        for name, layer in lora_layers(peft_model).items():
            start = peft_delta(layer, "default")
            if start is not None:
                self.start[name] = LowRank(start.b.detach().cpu().clone(), start.a.detach().cpu().clone(), start.scale)

    def delta_weights(self, deltas: dict[str, Any]) -> dict[str, Any]:
        out = dict(deltas)
        for name, start in self.start.items():
            if name in out:  # s B A - s B0 A0: low-rank still (2r), or dense where the loop's is
                value = out[name]
                out[name] = value - start if isinstance(value, LowRank) else value - start.dense().to(value.dtype)
        return out

    def save_adapter_extras(self, directory: Path) -> None:
        """Replace the loop's save by PEFT's conversion to a plain LoRA on W, the head copied back."""
        from safetensors.torch import load_file, save_file

        weights = Path(directory) / WEIGHTS_FILE
        plain = load_file(str(weights))
        self.model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=str(self.initial_dir))
        converted = load_file(str(weights))
        head = {k: v for k, v in plain.items() if k not in converted and ".lora_A." not in k and ".lora_B." not in k}
        save_file({**converted, **head}, str(weights), metadata={"format": "pt"})

    def close(self) -> None:
        initial = getattr(self, "_initial", None)
        if initial is not None:
            initial.cleanup()
