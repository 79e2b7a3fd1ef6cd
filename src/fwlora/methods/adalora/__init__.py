"""AdaLoRA, PEFT's implementation, configured as its authors' GLUE scripts and scaled to the run."""

from fwlora.methods.adalora.plugin import AdaLoRA, AdaLoRASettings, AdaLoraSchedule, default_alpha

__all__ = ["AdaLoRA", "AdaLoRASettings", "AdaLoraSchedule", "default_alpha"]
