"""LoRA-One against independent computations: the full fine-tuning gradient by plain autograd on a separate copy
of the model, its truncated SVD by numpy in float64, the merged weight W + s B0 A0 run through the base model,
the preconditioner by numpy's inverse, and PEFT's own save / load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TARGETS, batch, tiny_bert
from test_cli import tiny

from fwlora.cli import main
from fwlora.errors import MethodError
from fwlora.methods import RunInfo, get
from fwlora.methods.base import DataPass
from fwlora.methods.gradients import find_lora_layers

N_BATCHES = 3


def data_pass(offset: int = 100) -> DataPass:
    return DataPass(batches=lambda n: (batch(seed=offset + i) for i in range(n)), loss=lambda model, b: model(**b).loss)


def run_info(rank: int = 2, targets=TARGETS, **kw) -> RunInfo:
    return RunInfo(total_steps=10, seed=0, rank=rank, adapter_params=0, targets=list(targets),
                   modules_to_save=["classifier"], lora_alpha=kw.pop("lora_alpha", None), lora_dropout=0.0, **kw)


def built(name: str, rank: int = 2, targets=TARGETS, **settings):
    """(method, PEFT model) built on tiny_bert(seed 0) with the test's data pass."""
    cls = get(name)
    method = cls(cls.Settings(batches=N_BATCHES, **settings), run_info(rank, targets))
    method.data = data_pass()
    torch.manual_seed(1)
    return method, method.build(tiny_bert())


def full_gradients(n: int = N_BATCHES) -> dict[str, np.ndarray]:
    """Full fine-tuning's mean weight gradient of every Linear over n batches, by autograd on a fresh copy."""
    model = tiny_bert()
    model.train()
    for i in range(n):
        model(**batch(seed=100 + i)).loss.backward()
    return {name: (m.weight.grad / n).numpy() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def base_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def factors(layer) -> tuple[np.ndarray, np.ndarray]:
    return layer.lora_B["default"].weight.detach().numpy(), layer.lora_A["default"].weight.detach().numpy()


def test_initial_factors_are_the_stable_split_of_the_gradient_s_truncated_svd():
    gamma, r = 16.0, 2
    method, model = built("loraone", gamma=gamma)
    grads = full_gradients()
    layers = find_lora_layers(model)
    assert len(layers) == 12
    for name, layer in layers.items():
        u, s, vh = np.linalg.svd(-grads[base_name(name)], full_matrices=False)
        b, a = factors(layer)
        expected = (u[:, :r] * s[:r]) @ vh[:r] / (gamma * s[0])  # B0 A0 = [-G]_r / (gamma sigma_1)
        np.testing.assert_allclose(b @ a, expected, rtol=1e-8, atol=1e-12)
        # the split is balanced: B0^T B0 = A0 A0^T = diag(sigma_k / (gamma sigma_1)) (U_r S^1/2, S^1/2 V_r^T)
        np.testing.assert_allclose(b.T @ b, np.diag(s[:r] / (gamma * s[0])), atol=1e-10)
        np.testing.assert_allclose(a @ a.T, np.diag(s[:r] / (gamma * s[0])), atol=1e-10)
        assert method.captured[name] == pytest.approx((s[:r] ** 2).sum() / (s ** 2).sum(), rel=1e-9)
    assert method.summary()["initial_spectral_norm"] == pytest.approx(2.0 / gamma)  # s = alpha / r = 2


def test_the_model_starts_one_projected_gradient_step_away_and_w_is_kept():
    """The PEFT model computes the base model with W + s [-G]_r / (gamma sigma_1) merged by hand; its frozen W
    are untouched, and the gradient pass leaves no gradient and no requires_grad behind."""
    gamma = 4.0
    _, model = built("loraone", gamma=gamma)
    grads, reference = full_gradients(), tiny_bert()
    for name, layer in find_lora_layers(model).items():
        torch.testing.assert_close(layer.get_base_layer().weight, reference.get_submodule(base_name(name)).weight)
        assert not layer.get_base_layer().weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        for name, m in reference.named_modules():
            if name in {base_name(n) for n in find_lora_layers(model)}:
                u, s, vh = np.linalg.svd(-grads[name], full_matrices=False)
                m.weight += torch.from_numpy(2.0 * (u[:, :2] * s[:2]) @ vh[:2] / (gamma * s[0]))
    probe = batch(seed=7)
    model.eval(), reference.eval()
    torch.testing.assert_close(model(**probe).logits, reference(**probe).logits, rtol=1e-9, atol=1e-11)


def test_the_preconditioner_multiplies_by_the_regularised_inverse_grams():
    eps = 1e-3
    method, model = built("loraone", preconditioner="riemannian", precondition_eps=eps)
    method.attach(model)
    model(**batch(seed=3)).loss.backward()
    raw = {n: tuple(p.grad.clone().numpy() for p in (m.lora_A["default"].weight, m.lora_B["default"].weight))
           for n, m in method.layers.items()}
    method.before_optimizer_step(0, None)
    for name, layer in method.layers.items():
        b, a = factors(layer)
        ga, gb = raw[name]
        eye = np.eye(a.shape[0])
        np.testing.assert_allclose(layer.lora_A["default"].weight.grad.numpy(), np.linalg.inv(b.T @ b + eps * eye) @ ga,
                                   rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(layer.lora_B["default"].weight.grad.numpy(), gb @ np.linalg.inv(a @ a.T + eps * eye),
                                   rtol=1e-7, atol=1e-12)


def test_the_adapter_saves_and_loads_as_a_standard_peft_adapter(tmp_path):
    from peft import PeftModel

    _, model = built("loraone")
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path))
    probe = batch(seed=5)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(**probe).logits, model(**probe).logits, rtol=1e-12, atol=1e-12)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2


def test_settings_are_checked_and_build_needs_the_data_pass():
    cls = get("loraone")
    with pytest.raises(MethodError, match="gamma = 0.0: must be a finite number > 0"):
        cls.Settings(gamma=0.0)
    with pytest.raises(MethodError, match="preconditioner = 'adam'"):
        cls.Settings(preconditioner="adam")
    method = cls(cls.Settings(), run_info())
    with pytest.raises(MethodError, match="set method.data"):
        method.build(tiny_bert())


@pytest.mark.parametrize("method", ["loraone", "gora"])
def test_trains_through_the_cli_and_predicts(tmp_path, glue_dir, capsys, method):
    """A few steps through `fwlora train`; the initialisation's pass is timed as training; `fwlora predict`
    reloads the adapter (GoRA's per-matrix ranks from PEFT's rank_pattern) and reproduces the recorded metrics."""
    from peft.tuners.lora.layer import LoraLayer

    from fwlora.inference import load_run

    out = tmp_path / "run"
    assert main(tiny(glue_dir, out, "--method", method, "--rank", "2", f"--{method}-batches", "2",
                     "--report-to", "none")) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "complete" and record["method"] == method
    assert record["budget"]["trained_adapter_params_final"] <= record["budget"]["adapter_params"]
    assert 0 < record["timing"]["init_seconds"] < record["timing"]["train_seconds"]
    capsys.readouterr()
    assert main(["predict", str(out), "--output", str(tmp_path / "p.csv")]) == 0
    final = record["final"]
    assert f"mcc {final['mcc']:.4f}" in capsys.readouterr().err
    if method == "gora":
        loaded = {n.removeprefix("base_model.model."): int(m.r["default"]) for n, m in
                  load_run(out).model.named_modules() if isinstance(m, LoraLayer) and "classifier" not in n}
        assert loaded == record["method_info"]["ranks"]


@pytest.mark.parametrize("method", ["loraone", "gora", "specwide"])
def test_a_quantized_backbone_is_refused_by_the_shared_refusal(method):
    """The gradient-driven methods refuse a 4-bit backbone through Method.check, as PEFT's family does."""
    from fwlora.errors import UserError

    cls = get(method)
    run = run_info(quantized=True)
    with pytest.raises(UserError, match=rf"^--method {method} with --load-in-4bit: it reads the gradient of each "
                                        "full-precision base weight") as e:
        cls(cls.make_settings({}, run), run).check()
    assert "\n" not in str(e.value)
