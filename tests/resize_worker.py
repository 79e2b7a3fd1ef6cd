"""Run by test_ddp_resize.py under torchrun: trains a resizing method with the engine's Trainer and dumps, per
rank, its adapter at the resize and at the end (<out>/rank<k>.safetensors) and what the accelerator holds
(<out>/rank<k>.json)."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path


def wrappers(model) -> int:
    """How many wrappers (Accelerate's autocast and fp32 conversion) sit on the model's forward."""
    forward, depth = model.forward, 0
    while hasattr(forward, "__wrapped__"):
        forward, depth = forward.__wrapped__, depth + 1
    return depth


def main() -> None:
    config_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    from safetensors.torch import save_file

    from fwlora.config import TrainConfig
    from fwlora import models
    from fwlora.train import setup, summarise
    from fwlora.trainer import StopSignals, Trainer

    cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
    s = setup(cfg)
    out.mkdir(parents=True, exist_ok=True)
    t = Trainer(s, out / "run")
    seen: dict = {"old": [], "models_after": [], "new_wrapper": [], "forward_wrappers": [wrappers(t.unwrapped)]}
    tensors = {}
    refresh = t.refresh_parameters

    def watched() -> None:  # the resize: keep a weak reference to the DDP wrapper it replaces
        before = t.model
        seen["old"].append(weakref.ref(before))
        refresh()
        seen["models_after"].append(len(t.accelerator._models))
        seen["new_wrapper"].append(t.model is not before and getattr(t.model, "module", None) is t.unwrapped)
        seen["forward_wrappers"].append(wrappers(t.unwrapped))
        tensors.update({f"resized/{n}": p.detach().cpu().clone() for n, p in t.unwrapped.named_parameters()
                        if p.requires_grad})

    t.refresh_parameters = watched
    with StopSignals() as stop:
        t.fit(stop)
    gc.collect()
    calls = []  # the end-of-run matrix table (its SVDs) is the main process's alone
    delta_weights = models.delta_weights
    models.delta_weights = lambda model: calls.append(1) or delta_weights(model)
    matrices = len(summarise(t, {}, 0.0).matrices)
    rank = t.accelerator.process_index
    tensors |= {f"end/{n}": p.detach().cpu().contiguous() for n, p in t.unwrapped.named_parameters() if p.requires_grad}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world": t.accelerator.num_processes, "steps": t.global_step, "models_after": seen["models_after"],
        "new_wrapper": seen["new_wrapper"], "forward_wrappers": seen["forward_wrappers"],
        "old_wrappers_alive": sum(r() is not None for r in seen["old"]),
        "models_at_end": [m is t.unwrapped for m in t.accelerator._models],
        "delta_weights_calls": len(calls), "matrices": matrices}))


if __name__ == "__main__":
    main()
