"""The methods behind one interface (fwlora.methods): each builds its PEFT model for the run's budget."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny_bert
from test_models import build_method

from fwlora import methods, models
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
    assert len(deltas) == 12 and all(float(d.dense().abs().max()) == 0.0 for d in deltas.values())  # E starts at 0


def test_adalora_s_orthogonal_regulariser_is_in_the_loss_whatever_the_peft_wrapper():
    """The generic PeftModel (a classifier without a PEFT task type) skips AdaLoraModel.forward, where PEFT adds
    the regulariser; the plug-in adds it there, with PEFT's formula (checked against PEFT's own forward)."""
    from peft import PeftModel

    from fwlora.methods.adalora.plugin import orthogonal_regulariser
    from fwlora.methods.base import RunInfo

    model = build_method(tiny_bert(), "adalora", 2, models.TARGET_MODULES["bert"], total_steps=10, adalora_alpha=12.0)
    assert type(model) is PeftModel  # the generic wrapper
    run = RunInfo(total_steps=10, seed=0, rank=2, adapter_params=0, targets=models.TARGET_MODULES["bert"],
                  modules_to_save=["classifier"], lora_alpha=None, lora_dropout=0.0)
    method = methods.get("adalora")(methods.get("adalora").make_settings({}), run)
    method.check()
    method.attach(model)
    assert method.regulariser_here
    b = batch()
    with torch.no_grad():
        plain = model(**b).loss
        with_reg = model.base_model(**b).loss  # PEFT's own AdaLoraModel.forward adds the regulariser
        ours = method.extra_loss()
    assert float(with_reg - plain) == pytest.approx(float(ours), rel=1e-10) and float(ours) > 0
    factors = [(p, "lora_A" in n) for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    by_hand = torch.stack([torch.linalg.matrix_norm((p @ p.T if a else p.T @ p) - torch.eye((p @ p.T if a else p.T @ p).shape[0],
                                                                                   dtype=p.dtype)) for p, a in factors]).mean()
    assert float(orthogonal_regulariser(factors)) == pytest.approx(float(by_hand), rel=1e-12)


def test_the_batched_orthogonal_regulariser_is_peft_s_in_value_and_gradient():
    """float64: the batched regulariser against PEFT's own AdaLoraModel.forward (its loss minus the plain loss)
    and against PEFT's loop written out, value and gradient (autograd) for every A and B factor."""
    from fwlora.methods.adalora.plugin import orthogonal_regulariser
    from fwlora.methods.base import RunInfo

    model = build_method(tiny_bert(), "adalora", 2, models.TARGET_MODULES["bert"], total_steps=10, adalora_alpha=12.0)
    run = RunInfo(total_steps=10, seed=0, rank=2, adapter_params=0, targets=models.TARGET_MODULES["bert"],
                  modules_to_save=["classifier"], lora_alpha=None, lora_dropout=0.0)
    method = methods.get("adalora")(methods.get("adalora").make_settings({}), run)
    method.check()
    method.attach(model)
    torch.manual_seed(3)
    with torch.no_grad():  # away from PEFT's near-orthogonal start, so that every term is well above 0
        for p, _ in method._factors:
            p.add_(0.3 * torch.randn_like(p))
    factors = method._factors
    params = [p for p, _ in factors]
    assert len({tuple((p if a else p.T).shape) for p, a in factors}) > 1  # several groups of shapes
    assert all(p.dtype == torch.float64 for p in params)

    def loop(factors):  # PEFT's AdaLoraModel.forward, one factor at a time
        total = 0
        for p, is_a in factors:
            cov = p @ p.T if is_a else p.T @ p
            total = total + torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype), p="fro")
        return total / len(factors)

    ours = orthogonal_regulariser(factors)
    b = batch()
    peft = (model.base_model(**b).loss - model(**b).loss) / method.settings.orth_reg
    reference = loop(factors)
    for other in (reference, peft):
        assert float(ours) == pytest.approx(float(other), rel=1e-10)
    grads = torch.autograd.grad(ours, params, retain_graph=True)
    for other in (reference, peft):
        for g, h in zip(grads, torch.autograd.grad(other, params, retain_graph=True), strict=True):
            torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-12)
    assert float(method.extra_loss()) == pytest.approx(method.settings.orth_reg * float(ours), rel=1e-12)
