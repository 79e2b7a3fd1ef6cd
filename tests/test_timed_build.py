"""A method's timed build (train.timed_build, LoRA-GA here: a gradient pass before training): the one-off costs
of a first forward and backward are paid on the bare model before its clock starts (LoRA pays them in the loop's
untimed warm-up step), the build itself is inside the clock and in the run's training seconds, and the warm-up
leaves nothing behind (the run's numbers are those of a run without it)."""

from __future__ import annotations

import json

from test_cli import tiny

from fwlora import train as train_module
from fwlora.cli import main
from fwlora.methods import get

BUILD, WARM_UP = 100.0, 1000.0  # seconds a fake clock advances while the build and the warm-up run


class FakeClock:
    """train.py's clock: it moves only when told, so what the timer covers is read exactly."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _run(glue_dir, out, *extra):
    assert main(tiny(glue_dir, out, "--method", "loraga", "--loraga-batches", "2", "--report-to", "none",
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
