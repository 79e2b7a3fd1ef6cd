"""Methods as plug-ins: each is a folder (its settings, its math, its plug-in), behind one interface
(base.py) and one registry (registry.py). The warm-up statistic FW-LoRA and fwrank share is gradients/.

Built in: lora, adalora, fwlora, fwrank, widecut, loraone, gora, specwide, and PEFT's LoRA family (peft_lora.py:
rslora, dora, pissa, olora, loraga, eva, loraplus). A method of your own is one file:

    from fwlora.methods import Method, register, lora_config

    @register
    class Frozen(Method):
        name, label = "mine", "My LoRA"
        def build(self, model):
            from peft import get_peft_model
            return get_peft_model(model, lora_config(self.run, self.run.rank, 2.0 * self.run.rank))

and `FWLORA_METHODS=my_module` (module names or .py paths, comma-separated) makes `fwlora train`,
`bench`, `report` and `sweep` import it before they parse their arguments.
"""

from fwlora.methods.base import Method, NoSettings, RunInfo, TimeHypothesis, lora_config, with_help
from fwlora.methods.registry import (PLUGINS_ENV, REGISTRY, all_settings, get, label, load_plugins, method_class,
                                     names, owner_of, reference_name, register, rival_name, ships_with,
                                     time_hypothesis, with_figure)

# the built-in methods register themselves on import, in this order (the report's column order)
from fwlora.methods.lora import plugin as _lora  # noqa: E402,F401
from fwlora.methods.adalora import plugin as _adalora  # noqa: E402,F401
from fwlora.methods.fwlora import plugin as _fwlora  # noqa: E402,F401
from fwlora.methods.fwrank import plugin as _fwrank  # noqa: E402,F401
from fwlora.methods.widecut import plugin as _widecut  # noqa: E402,F401
from fwlora.methods.loraone import plugin as _loraone  # noqa: E402,F401
from fwlora.methods.gora import plugin as _gora  # noqa: E402,F401
from fwlora.methods.specwide import plugin as _specwide  # noqa: E402,F401
from fwlora.methods.rslora import plugin as _rslora  # noqa: E402,F401
from fwlora.methods.dora import plugin as _dora  # noqa: E402,F401
from fwlora.methods.pissa import plugin as _pissa  # noqa: E402,F401
from fwlora.methods.olora import plugin as _olora  # noqa: E402,F401
from fwlora.methods.loraga import plugin as _loraga  # noqa: E402,F401
from fwlora.methods.eva import plugin as _eva  # noqa: E402,F401
from fwlora.methods.loraplus import plugin as _loraplus  # noqa: E402,F401

__all__ = ["Method", "NoSettings", "RunInfo", "TimeHypothesis", "PLUGINS_ENV", "REGISTRY", "register", "get", "names",
           "label", "all_settings", "owner_of", "load_plugins", "lora_config", "with_help", "method_class",
           "reference_name", "rival_name", "ships_with", "time_hypothesis", "with_figure"]
