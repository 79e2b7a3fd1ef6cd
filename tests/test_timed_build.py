"""A method's timed build (train.timed_build: a gradient pass, an SVD of every weight) and a resize inside the
loop, read with a fake clock:
- LoRA-GA: the one-off costs of a first forward and backward are paid on the bare model before its clock starts
  (LoRA pays them in the loop's untimed warm-up step), the build itself is inside the clock and in the run's
  training seconds, and the warm-up leaves nothing behind (the run's numbers are those of a run without it);
- every method that works before training (by its flags, from the registry) has its build in the run's time;
- widecut's cut, a resize inside an optimizer step, is in that step's time and in the run's."""

from __future__ import annotations

import json
import time

import pytest

from test_cli import tiny

from fwlora import device as device_module
from fwlora import train as train_module
from fwlora import trainer as trainer_module
from fwlora.cli import main
from fwlora.methods import REGISTRY, get

BUILD, WARM_UP, CUT = 100.0, 1000.0, 10.0  # seconds a fake clock advances while each runs
# every method whose build works before training, with the flags that keep its pass short on the tiny run
TIMED = {"loraga": ["--loraga-batches", "2"], "eva": ["--eva-batches", "2"], "pissa": [], "olora": [],
         "gora": ["--gora-batches", "2"], "loraone": ["--loraone-batches", "2"],
         "specwide": ["--specwide-batches", "2", "--specwide-cut-at", "1"]}


class FakeClock:
    """train.py's clock: it moves only when told, so what the timer covers is read exactly."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):  # the rest of the time module, real
        return getattr(time, name)


def _run(glue_dir, out, method="loraga", *extra):
    assert main(tiny(glue_dir, out, "--rank", "2", "--method", method, *TIMED.get(method, []), "--report-to", "none",
                     *extra)) == 0
    return json.loads((out / "result.json").read_text())


def test_the_pass_warms_up_untimed_and_its_build_is_timed(tmp_path, glue_dir, monkeypatch):
    from peft.tuners.lora.layer import LoraLayer

    events, clock = [], FakeClock()
    real_warm_up, cls = train_module.warm_up_step, get("loraga")
    real_build = cls.build

    def warm_up(model, optimizer, params, batch, device):
        adapted = {n for n, p in model.named_parameters() if p.requires_grad}
        events.append(("warm-up", optimizer, any(isinstance(m, LoraLayer) for m in model.modules()),
                       all(n.endswith(".weight") and "classifier" not in n for n in adapted) and bool(adapted)))
        clock.now += WARM_UP
        real_warm_up(model, optimizer, params, batch, device)

    def slow_build(self, model):
        events.append(("build", all(p.requires_grad for p in model.parameters())))  # the flags came back
        clock.now += BUILD
        return real_build(self, model)

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "warm_up_step", warm_up)
    monkeypatch.setattr(cls, "build", slow_build)
    record = _run(glue_dir, tmp_path / "slow")
    # on the bare model, no optimizer, gradients for the adapted weights only; then the build
    assert events == [("warm-up", None, False, True), ("build", True)]
    timing = record["timing"]
    assert timing["init_seconds"] == BUILD  # the build is inside the clock, the warm-up outside it ...
    assert timing["train_seconds"] > BUILD  # ... and the build's seconds are in the training time
    # the same run without the warm-up: the same numbers to the last digit (it changed nothing it ran on)
    monkeypatch.setattr(train_module, "warm_up_step", lambda *a: None)
    monkeypatch.setattr(cls, "build", real_build)
    again = _run(glue_dir, tmp_path / "plain")
    assert again["final"]["loss"] == record["final"]["loss"] and again["final"]["mcc"] == record["final"]["mcc"]


def test_every_method_that_works_before_training_is_timed_here():
    """A method whose build reads data or decomposes weights says so by its flags; this file times them all (the
    built-in ones: a test's plugin may have registered more)."""
    assert {m for m, cls in REGISTRY.items() if cls.__module__.startswith("fwlora.methods.")
            and (cls.uses_data_pass or cls.timed_init)} == set(TIMED)


@pytest.mark.parametrize("method", sorted(TIMED))
def test_the_build_is_in_the_run_s_training_time(method, tmp_path, glue_dir, monkeypatch):
    clock, cls = FakeClock(), get(method)
    real_build = cls.build

    def slow_build(self, model):
        clock.now += BUILD
        return real_build(self, model)

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(cls, "build", slow_build)
    timing = _run(glue_dir, tmp_path / method, method)["timing"]
    assert timing["init_seconds"] == BUILD
    assert timing["train_seconds"] > BUILD  # the build's seconds and the loop's (real) ones
    assert timing["load_seconds"] < BUILD  # and not in loading


@pytest.mark.parametrize("method, flags", [("widecut", ["--widecut-cut-at", "1"]), ("specwide", [])])
def test_the_cut_is_in_its_step_s_time_and_the_run_s(method, flags, tmp_path, glue_dir, monkeypatch):
    """Every clock the run reads is the fake one, which moves only while the cut runs: the run's training time is
    the cut's, and it lands in the wide phase's last step (step 1 of 2)."""
    clock, cls = FakeClock(), get(method)
    real_step, cuts = cls.after_optimizer_step, []

    def slow_cut(self, step):
        resized = real_step(self, step)
        if resized:  # the cut's seconds (the optimizer's refresh follows, in the same step)
            cuts.append(step)
            clock.now += CUT
        return resized

    for module in (train_module, trainer_module, device_module):
        monkeypatch.setattr(module, "time", clock)
    monkeypatch.setattr(cls, "after_optimizer_step", slow_cut)
    record = _run(glue_dir, tmp_path / method, method, *flags)
    timing = record["timing"]
    assert cuts == [0] and record["method_info"]["cut_at"] == 1
    assert timing["train_seconds"] == CUT and timing["optimizer_steps"] == 2
    assert timing["warmup_seconds"] == CUT and timing["after_warmup_step_seconds_median"] == 0.0
