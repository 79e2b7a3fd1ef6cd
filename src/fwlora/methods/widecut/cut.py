"""widecut on a PEFT LoRA model: train wide, cut once (docs/method.md).

The model trains plain LoRA at a width above the budget's rank (the adapter config's r). After optimizer step K
(`cut_at`) each matrix m gets a rank r_m under the budget r * sum_m (d_in + d_out) (methods/ranks.py's rules:
every matrix at r, or a greedy on what it learned) and is cut to the best rank-r_m approximation of its
learned dW = s B A; training then goes on at those shapes. No statistic is measured on the way (the rule
`energy` looks at the inputs of the cut step alone), so until the cut each step is LoRA's at the width.

Depends on torch, peft, fwlora.errors / files / checks, methods/gradients/, methods/lowrank.py and
methods/ranks.py only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fwlora.errors import MethodError
from fwlora.files import write_text_atomic
from fwlora.methods.gradients import (GradientHooks, check_reachable, find_lora_layers, is_fraction,
                                      same_on_every_process, single_active_adapter)
from fwlora.lowrank import lora_delta
from fwlora.methods.ranks import (ResizeReport, allocate_spectrum, lora_tuner, output_energy, resize_lora_ranks,
                                  uniform_ranks, update_spectrum)
from fwlora.methods.widecut.config import WideCutConfig

STATE_FILE = "widecut_state.json"


class WideCut:
    """Usage, once per optimizer step:  optimizer.step(); if cut.step(): refresh_optimizer(optimizer, model)."""

    def __init__(self, model: nn.Module, config: WideCutConfig | None = None, adapter_name: str | None = None,
                 total_steps: int | None = None):
        self.config = (config or WideCutConfig()).resolve(total_steps)
        check_reachable(self.config.cut_at, total_steps, "the cut")
        self.model = model
        self.layers = find_lora_layers(model)
        self.names = list(self.layers)
        self.adapter_name = adapter_name or single_active_adapter(next(iter(self.layers.values())))
        self.dims = {n: (int(m.in_features), int(m.out_features)) for n, m in self.layers.items()}
        self.width = int(lora_tuner(model).peft_config[self.adapter_name].r)
        self.rank = self.config.target_rank or self.width
        if self.rank > self.width:
            raise MethodError(f"target rank {self.rank} > the adapter's width {self.width}: there is nothing to cut")
        self.budget = self.rank * sum(d_in + d_out for d_in, d_out in self.dims.values())
        self.steps_done = 0
        self.ranks: dict[str, int] = {}
        self.spectra: dict[str, list[float]] = {}
        self.param_counts = {"warmup": self.width * sum(d_in + d_out for d_in, d_out in self.dims.values()),
                             "after": None, "budget": self.budget}
        self.last_resize: ResizeReport | None = None
        self._inputs: dict[str, list] = {}
        self._hooks = GradientHooks(self.layers, self._cut_step, self._fold_inputs) if self.config.rule == "energy" else None
        if self._hooks is not None:
            self._hooks.attach()

    @property
    def cut_done(self) -> bool:
        return self.steps_done >= self.config.cut_at

    def _cut_step(self) -> bool:
        return self.steps_done == self.config.cut_at - 1

    def _fold_inputs(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """On the cut step: each layer's inputs through its A, tokens the loss reaches only (for `energy`)."""
        with torch.no_grad():
            keep = g.detach().reshape(-1, g.shape[-1]).ne(0).any(dim=1)
            a = self.layers[name].lora_A[self.adapter_name].weight.detach()
            proj = (x.reshape(-1, x.shape[-1])[keep].to(a.dtype) @ a.T).double()
            entry = self._inputs.setdefault(name, [a.double().clone(), torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64,
                                                                                    device=a.device), 0])
            entry[1] += proj.T @ proj
            entry[2] += int(keep.sum())

    def step(self) -> bool:
        """Close one optimizer step (after optimizer.step()); True on the step that cut the model."""
        if self.cut_done:
            return False
        self.steps_done += 1
        if not self.cut_done:
            return False
        self._cut()
        return True

    def _cut(self) -> None:
        if self._hooks is not None:
            self._hooks.detach()
        if self.config.rule == "uniform":  # r_max bounds the greedy rules only: uniform keeps LoRA's rank everywhere
            ranks = uniform_ranks(self.names, self.rank, {n: min(self.width, *self.dims[n]) for n in self.names})
        else:
            if self.config.rule == "update":
                self.spectra = {n: update_spectrum(self.layers[n], self.adapter_name) for n in self.names}
            else:
                for n in self.names:
                    layer = self.layers[n]
                    basis, gram, count = self._inputs.get(n, [layer.lora_A[self.adapter_name].weight, torch.zeros(1, 1), 0])
                    self.spectra[n] = output_energy(lora_delta(layer, self.adapter_name), basis, gram, count)
            cost = {n: sum(self.dims[n]) for n in self.names}
            cap = {n: min(self.config.r_max, self.width, *self.dims[n]) for n in self.names}
            ranks = allocate_spectrum(self.spectra, cost, self.budget, cap)
        self.ranks = same_on_every_process({n: ranks[n] for n in self.names}, next(self.model.parameters()).device)
        self._inputs = {}
        self._apply_ranks()

    def _apply_ranks(self) -> None:
        present = find_lora_layers(self.model)
        self.last_resize = resize_lora_ranks(self.model, {n: r for n, r in self.ranks.items() if n in present},
                                             self.adapter_name)
        self.layers = dict(find_lora_layers(self.model))
        self.param_counts["after"] = sum(int(m.r[self.adapter_name]) * sum(self.dims[n]) for n, m in self.layers.items())

    def trained_params_over_run(self, total_steps: int) -> dict[str, float]:
        """Adapter parameters before the cut, after it, and their mean over the run's steps."""
        k = min(self.config.cut_at, total_steps)
        after = self.param_counts["after"] if self.param_counts["after"] is not None else self.param_counts["warmup"]
        mean = (k * self.param_counts["warmup"] + (total_steps - k) * after) / max(total_steps, 1)
        return {"warmup": self.param_counts["warmup"], "after": after, "mean": mean, "budget": self.budget}

    # ---- state: a small JSON (no tensors: the cut happens inside one step) ----

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "config": asdict(self.config), "ranks": dict(self.ranks),
                "dims": {n: list(d) for n, d in self.dims.items()}, "width": self.width,
                "param_counts": dict(self.param_counts), "spectra": self.spectra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a state past the cut re-applies its ranks to this model (a no-op where shapes already match)."""
        if state["config"] != asdict(self.config):
            raise MethodError(f"saved widecut state has config {state['config']}, this run has {asdict(self.config)}")
        if any(tuple(state["dims"].get(n, ())) != d for n, d in self.dims.items()):
            raise MethodError("saved widecut state belongs to a model with other adapted layers")
        self.steps_done, self.width = int(state["steps_done"]), int(state["width"])
        self.param_counts, self.spectra = dict(state["param_counts"]), dict(state["spectra"])
        self.dims = {n: tuple(d) for n, d in state["dims"].items()}
        self.names = list(self.dims)
        if self.cut_done:
            if self._hooks is not None:
                self._hooks.detach()
            self.ranks = {n: int(r) for n, r in state["ranks"].items()}
            self._apply_ranks()

    def save(self, directory: str | Path) -> Path:
        return write_text_atomic(Path(directory) / STATE_FILE, json.dumps(self.state_dict()))

    def load(self, directory: str | Path) -> None:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise MethodError(f"no widecut state at {path}")
        self.load_state_dict(json.loads(path.read_text(encoding="utf-8")))

    def remove(self) -> None:
        if self._hooks is not None:
            self._hooks.detach()


__all__ = ["STATE_FILE", "WideCut", "WideCutConfig", "is_fraction"]
