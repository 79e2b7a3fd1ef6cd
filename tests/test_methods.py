"""The methods behind one interface (fwlora.methods): each builds its PEFT model for the run's budget."""

from __future__ import annotations

import pytest
from conftest import tiny_bert
from test_models import build_method

from fwlora import models
from fwlora.errors import UserError
from fwlora.methods.adalora import AdaLoraSchedule


def test_adalora_schedule_scales_the_authors_fractions():
    s = AdaLoraSchedule.scaled(804)
    assert (s.total_step, s.tinit, s.tfinal, s.deltaT) == (804, 96, 386, 1)  # 12 %, 48 %, every 0.15 %
    s = AdaLoraSchedule.scaled(50_500)
    assert (s.tinit, s.tfinal, s.deltaT) == (6060, 24240, 76)
    with pytest.raises(UserError, match="budgeting phase"):
        AdaLoraSchedule.scaled(10, tinit_frac=0.5, tfinal_frac=0.5)


def test_adalora_model_and_its_rank_pattern():
    model = build_method(tiny_bert(), "adalora", 2, models.TARGET_MODULES["bert"], total_steps=10, adalora_alpha=12.0,
                         adalora_tinit=0.1, adalora_tfinal=0.2)  # total_step 10, tinit 1, tfinal 2, deltaT 1
    config = next(iter(model.peft_config.values()))
    assert (config.total_step, config.tinit, config.tfinal, config.deltaT, config.lora_alpha) == (10, 1, 2, 1, 12.0)
    layer = next(iter(models.adapted_layers(model).values()))
    assert layer.lora_A["default"].shape[0] == 3  # init_r = ceil(1.5 * 2)
    deltas = models.delta_weights(model)
    assert len(deltas) == 12 and all(float(d.abs().max()) == 0.0 for d in deltas.values())  # E starts at 0


