"""Numbers right on any device, checked on the CPU: the untimed warm-up step leaves a run's result unchanged, step
times are read at logging points (not with a sync per step), each run of a process reports its own peak memory,
the record names device and precision, and under fp16 a GradScaler's skipped step is not divergence (nor food for
a method's statistics) while a collapsing loss scale is."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fwlora import device as device_module
from fwlora import train as train_module
from fwlora import trainer as trainer_module
from fwlora.config import TrainConfig
from fwlora.errors import NonFiniteError
from fwlora.train import train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_distributed import sentence_data, tiny_model_dir

    root = tmp_path_factory.mktemp("device")
    return tiny_model_dir(root), sentence_data(root, n=64)


def config(tiny, out: Path, **overrides) -> TrainConfig:
    """64 examples at batch 8: 8 optimizer steps per epoch."""
    model, data = tiny
    return TrainConfig.from_dict({"model": str(model), "task": "sst2", "data_dir": str(data), "method": "lora",
                                  "rank": 2, "epochs": 2, "batch_size": 8, "lr": 1e-2, "max_length": 16,
                                  "eval_batch_size": 32, "report_to": "none", "threads": 1,
                                  "output_dir": str(out), **overrides})


def keep_trainers(monkeypatch, after_init=None) -> list:
    """Swap train's Trainer for a subclass that keeps each instance (and may change it after __init__)."""
    made = []

    class Kept(trainer_module.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            if after_init is not None:
                after_init(self)
            made.append(self)

    monkeypatch.setattr(train_module, "Trainer", Kept)
    return made


def without_timing(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if "seconds" not in k} for e in entries]


# ---- the warm-up step -------------------------------------------------------------------------------------


def test_a_run_is_the_same_to_the_last_digit_with_and_without_the_warm_up_step(tiny, tmp_path, monkeypatch):
    """Dropout on the adapters draws from the RNG, AdamW makes state and FW-LoRA hooks the backward pass: the
    warm-up touches all three, and must leave no trace."""
    settings = dict(method="fwlora", lora_dropout=0.1, fw_warmup_steps=4, lambda_fw=5.0)
    calls = []
    real = device_module.warm_up_step
    monkeypatch.setattr(trainer_module, "warm_up_step", lambda *a: (calls.append(1), real(*a)))
    warm = train(config(tiny, tmp_path / "warm", **settings)).to_dict()
    assert calls == [1]
    monkeypatch.setattr(trainer_module, "warm_up_step", lambda *a: None)
    cold = train(config(tiny, tmp_path / "cold", **settings)).to_dict()
    assert without_timing(warm["epochs"]) == without_timing(cold["epochs"])  # losses, penalty, metrics: exact
    assert warm["matrices"] == cold["matrices"]  # norms, singular values, Fisher scores, importance
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("warm", "cold"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_warm_up_step_is_undone_even_where_it_trains():
    """warm_up_step alone: after a real AdamW step the parameters, the optimizer state and the RNG are back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return type("Out", (), {"loss": self.net(x).square().mean()})()

    wrapped = WithLoss().eval()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    x = torch.randn(8, 4)
    rng = torch.get_rng_state()
    device_module.warm_up_step(wrapped, optimizer, params, {"x": x}, torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and all(p.grad is None for p in params)
    assert not optimizer.state and not wrapped.training
    assert torch.equal(torch.get_rng_state(), rng)


# ---- clocks, memory, the record -----------------------------------------------------------------------------


def test_step_times_are_read_at_logging_points_and_the_record_names_the_device(tiny, tmp_path, monkeypatch):
    syncs = []
    monkeypatch.setattr(trainer_module, "device_sync", lambda device: syncs.append(device))
    made = keep_trainers(monkeypatch)
    result = train(config(tiny, tmp_path / "run", log_every=8)).to_dict()
    t = made[0]
    steps, epochs = 16, 2
    assert len(t.step_seconds) == steps and all(s > 0 for s in t.step_seconds)
    # one sync at each epoch's start and end, one per logging point (every 8 steps): never one per step
    assert len(syncs) == 2 * epochs + steps // 8 < steps
    env = result["env"]
    assert (env["device"], env["dtype"], env["mixed_precision"]) == ("cpu", "float32", "no")
    assert env["tf32"] is None and env["fused_adamw"] is False and env["pin_memory"] is False
    assert "cuda_version" in env and env["cuda_version"] == torch.version.cuda
    boot = Path("/proc/sys/kernel/random/boot_id")  # the machine's boot: time ratios pair within one only
    assert env["boot_id"] == (boot.read_text().strip() if boot.is_file() else None)
    on_disk = json.loads((tmp_path / "run" / "config.json").read_text())["env"]
    assert on_disk["device"] == "cpu" and on_disk["fused_adamw"] is False


def test_step_clock_times_each_step_from_its_marks(monkeypatch):
    clock = device_module.StepClock(torch.device("cpu"))
    ticks = iter([10.0, 10.5, 11.25, 12.0, 20.0, 20.125])
    monkeypatch.setattr(device_module.time, "perf_counter", lambda: next(ticks))
    clock.start()
    clock.lap()
    clock.lap()
    assert clock.read() == [0.5, 0.75]
    clock.lap()
    assert clock.read() == [0.75]  # from the last mark read
    clock.start()  # a pause (evaluation) is not a step
    clock.lap()
    assert clock.read() == [0.125] and clock.read() == []


def clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not clear_refs_works(), reason="the peak RSS cannot be reset here (Linux /proc/self/clear_refs)")
def test_two_runs_in_one_process_report_their_own_peak_memory(tiny, tmp_path, monkeypatch):
    """The first run holds 256 MiB for one step; the second, started after, must not report that peak."""
    big = 256 * 2**20
    original = trainer_module.Trainer._optimizer_step
    held = []

    def hungry(self):
        if self.global_step == 2:
            held.append(torch.ones(big // 4))  # float32, every page touched
        elif held:
            held.clear()
        original(self)

    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "_optimizer_step", hungry)
        first = train(config(tiny, tmp_path / "first", epochs=1)).to_dict()["timing"]["peak_memory"]
    second = train(config(tiny, tmp_path / "second", epochs=1)).to_dict()["timing"]["peak_memory"]
    assert first["kind"] == second["kind"] == "process_peak_rss"
    assert first["since"] == second["since"] == "run start"
    assert first["bytes"] - second["bytes"] > 0.8 * big


# ---- fp16: the GradScaler's skipped step ----------------------------------------------------------------------


def install_scaler(t, scaler: torch.amp.GradScaler, autocast: bool = False) -> None:
    """Make a CPU Trainer run as Accelerate runs fp16 on a GPU: its GradScaler scales the loss, unscales before
    clipping and skips a step whose gradient overflowed (Accelerate builds none off CUDA)."""
    from accelerate.optimizer import patch_optimizer_step

    acc, opt = t.accelerator, t.optimizer
    assert acc.mixed_precision == "fp16"
    acc.scaler, acc.native_amp = scaler, True
    opt.scaler = scaler
    opt._accelerate_step_called = False
    opt._optimizer_original_step_method = opt.optimizer.step
    opt._optimizer_patched_step_method = patch_optimizer_step(opt, opt.optimizer.step)
    if autocast:
        t.model.forward = torch.autocast("cpu", dtype=torch.float16)(t.model.forward)


@pytest.mark.parametrize("method", ["fwlora", "adalora"])
def test_an_fp16_overflow_is_a_skipped_step_not_divergence(tiny, tmp_path, monkeypatch, method):
    """A loss scale of 2^100 overflows fp16 at step 1; the scaler skips it and backs off to 2^8. The run goes
    on, the schedule does not count the skipped step, the parameters did not move on it, and neither FW-LoRA's
    Fisher EMA nor AdaLoRA's importance takes its inf gradient."""
    from peft.tuners.adalora.layer import RankAllocator

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-92, growth_interval=10**6)
    made = keep_trainers(monkeypatch, lambda t: install_scaler(t, scaler, autocast=True))
    seen = {}
    original_step = trainer_module.Trainer._optimizer_step

    def watched(self):
        before = [p.detach().clone() for p in self.params]
        original_step(self)
        if self.global_step == 1:
            seen["moved"] = any(not torch.equal(p, q) for p, q in zip(self.params, before))

    monkeypatch.setattr(trainer_module.Trainer, "_optimizer_step", watched)
    fed = []
    update_ipt = RankAllocator.update_ipt

    def spy(self, model):
        fed.append(all(bool(p.grad.isfinite().all()) for n, p in model.named_parameters()
                       if "lora_" in n and p.grad is not None))
        return update_ipt(self, model)

    monkeypatch.setattr(RankAllocator, "update_ipt", spy)
    result = train(config(tiny, tmp_path / "run", method=method, mixed_precision="fp16", fw_warmup_steps=4,
                          fw_measure_every=1, lambda_fw=5.0)).to_dict()
    t = made[0]
    assert result["status"] == "complete"
    assert scaler.get_scale() == 2.0**8  # one backoff: exactly one step overflowed
    assert seen["moved"] is False
    assert t.scheduler.scheduler.last_epoch == 16 - 1  # the schedule counts the 15 applied updates
    if method == "fwlora":
        fisher = torch.tensor(list(t.method.fw.fisher.values()))
        assert torch.isfinite(fisher).all() and (fisher > 0).all()
        assert sum(r["importance"] for r in result["matrices"]) == pytest.approx(1.0)
    else:
        assert fed and all(fed)  # PEFT's importance never read an inf gradient
        assert all(r["adalora_rank"] is not None for r in result["matrices"])


def test_a_collapsing_loss_scale_is_divergence(tiny, tmp_path, monkeypatch):
    """Gradients that overflow at every step (even unscaled): the scale halves from 4 to 0.5 in three skipped
    steps, and the run stops there as diverged, naming the steps."""
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0, growth_interval=10**6)

    def poison(t):
        install_scaler(t, scaler)
        next(p for p in t.params).register_hook(lambda g: g * math.inf)

    keep_trainers(monkeypatch, poison)
    with pytest.raises(NonFiniteError, match=r"fp16: the gradient overflowed at 3 optimizer steps in a row \(up to "
                                             r"step 3, epoch 1\) and the loss scale fell to 0\.5"):
        train(config(tiny, tmp_path / "run", mixed_precision="fp16"))
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "failed" and "loss scale" in result["error"]
