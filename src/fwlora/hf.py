"""FW-LoRA and fwrank in the Hugging Face Trainer ecosystem: callbacks that do everything on their own (step,
save, restore, log), for any Trainer subclass, TRL's SFTTrainer included, and two Trainer subclasses on them.

    from fwlora.hf import FWLoRACallback
    trainer = Trainer(model=peft_model, args=TrainingArguments(...), train_dataset=...)   # or SFTTrainer
    trainer.add_callback(FWLoRACallback(FisherWeightedLoRA(peft_model, FWLoRAConfig(warmup_steps=0.25)), trainer))
    trainer.train()                      # resume_from_checkpoint=True works too

FWLoRACallback closes each optimizer step for FW-LoRA (after backward and clipping, before optimizer.step()):
the warm-up statistic, then, from step K+1 on, the penalty's gradient (closed form, added to the adapters'
gradients; FWLoRATrainer adds the penalty to the loss instead, so that clipping sees it). FWRankCallback
re-allocates after the K-th optimizer step and hands the Trainer's optimizer the new parameters. Both save
their state into every checkpoint, restore it when the Trainer loads a checkpoint's adapter (a resized
fwrank model takes its saved shapes before the weights load), resolve a warm-up given as a fraction of the
run (0.25) from the Trainer's max_steps and refuse a K the run never reaches before training starts, and
log through Trainer.log (the penalty, the importances, the ranks), so `report_to` gets them.
Under several processes (DDP) the Trainer's wrapped model keeps the old parameters: fwrank runs on one process.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer, TrainerCallback

from fwlora.errors import MethodError
from fwlora.methods.fwlora import STATE_FILE, FisherWeightedLoRA, FWLoRAConfig
from fwlora.methods.fwrank import RANK_STATE_FILE, FisherRankAllocation, FWRankConfig, refresh_optimizer


def _grad_scale(trainer: Trainer | None) -> Any:
    """The GradScaler's scale of this step's backward pass (fp16), None without one."""
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    return scaler.get_scale() if scaler is not None else None


def _unscale_gradients(trainer: Trainer | None, optimizer: Any) -> None:
    """Make .grad unscaled (fp16) if the Trainer has not yet: transformers 5 unscales before every
    on_pre_optimizer_step (its clip_grad_norm_ also measures the norm with clipping off), 4.x only when it
    clips. torch's GradScaler records per optimizer whether it has unscaled; its step then does not again."""
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    optimizer = optimizer if optimizer is not None else getattr(trainer, "optimizer", None)
    if scaler is None or optimizer is None:
        return
    from torch.amp.grad_scaler import OptState

    inner = optimizer
    while hasattr(inner, "optimizer"):  # Accelerate's AcceleratedOptimizer around the torch one
        inner = inner.optimizer
    if scaler._per_optimizer_states[id(inner)]["stage"] is OptState.READY:
        trainer.accelerator.unscale_gradients()


def _restore_on_adapter_load(model: Any, restore: Any) -> None:
    """Call restore(checkpoint_dir) whenever the Trainer loads a checkpoint's adapter into the model (its
    resume path for PEFT models), before the weights: a resized model must take its shapes first."""
    load_adapter = model.load_adapter

    def load_with_state(model_id: str, *args: Any, **kwargs: Any) -> Any:
        if os.path.isdir(str(model_id)):
            restore(str(model_id))
        return load_adapter(model_id, *args, **kwargs)

    model.load_adapter = load_with_state


class _Logger:
    """Values for Trainer.log, gathered by a callback between the Trainer's own logging steps."""

    def __init__(self, trainer: Trainer | None):
        self.trainer, self.pending = trainer, {}

    def add(self, values: dict[str, float]) -> None:
        self.pending.update(values)

    def flush(self, logs: dict[str, float] | None) -> None:
        """Merged into the Trainer's own logs when it logs; else logged on their own."""
        if not self.pending:
            return
        if logs is not None:
            logs.update(self.pending)
        elif self.trainer is not None:
            self.trainer.log(dict(self.pending))
        self.pending = {}


class FWLoRACallback(TrainerCallback):
    """FW-LoRA in any Trainer. add_penalty: add the penalty's gradient here (the callback alone); False where
    the Trainer adds the penalty to the loss itself (FWLoRATrainer)."""

    def __init__(self, fw: FisherWeightedLoRA, trainer: Trainer | None = None, add_penalty: bool = True):
        self.fw, self.trainer, self.add_penalty = fw, trainer, add_penalty
        self.log = _Logger(trainer)
        _restore_on_adapter_load(fw.model, self._restore)

    def _restore(self, checkpoint: str) -> None:
        if os.path.isfile(os.path.join(checkpoint, STATE_FILE)):
            self.fw.load(checkpoint)

    def on_train_begin(self, args, state, control, **kwargs):
        self.fw.start(state.max_steps)  # a fraction of the run becomes steps; an unreachable K is refused here

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scale = _grad_scale(self.trainer)
        if self.add_penalty and not self.fw.in_warmup:
            _unscale_gradients(self.trainer, optimizer)  # the penalty's gradient goes in unscaled
            self.log.add({"fw_penalty": float(self.fw.add_penalty_gradients())})
        self.fw.step(grad_scale=scale)  # its statistic is of what the backward hooks saw: still scaled
        if self.fw.steps_done == self.fw.config.warmup_steps:
            self.log.add({f"fw_importance/{n.removeprefix('base_model.model.')}": v
                          for n, v in self.fw.importance.items()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.log.flush(logs)

    def on_step_end(self, args, state, control, **kwargs):
        if self.log.pending and not control.should_log:
            control.should_log = True  # the importances at K: logged at that step

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.fw.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


def _per_sequence_loss(model: Any) -> bool:
    inner = model
    while hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return type(inner).__name__.endswith("ForSequenceClassification")


class FWLoRATrainer(Trainer):
    """transformers.Trainer training a PEFT LoRA model with FW-LoRA: the penalty in the loss (clipped with
    it, scaled for gradient accumulation as the Trainer scales the loss), the rest by FWLoRACallback."""

    def __init__(self, *args: Any, fw_config: FWLoRAConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if _per_sequence_loss(self.model):
            # transformers#47688: sequence-classification heads accept **kwargs but ignore num_items_in_batch,
            # so the Trainer would skip dividing their mean loss by the accumulation steps (an inflated
            # gradient with accumulation). Their loss is a per-batch mean: let the Trainer divide it.
            self.model_accepts_loss_kwargs = False
        self.fw = FisherWeightedLoRA(self.model, fw_config or FWLoRAConfig())
        self.add_callback(FWLoRACallback(self.fw, self, add_penalty=False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        penalty = self.fw.penalty()
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            # the Trainer will not divide this loss by the accumulation steps: do it for the penalty
            penalty = penalty / self.current_gradient_accumulation_steps
        loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """The Trainer's own rule (Trainer.training_step) for whether it divides the loss by the
        gradient-accumulation steps."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.fw.save(output_dir or self.args.output_dir)


class FWRankCallback(TrainerCallback):
    """fwrank in any Trainer: after the K-th optimizer step the model is resized and the Trainer's optimizer
    takes the new parameters; the allocation is saved into every checkpoint and restored (shapes first)
    when the Trainer loads one."""

    def __init__(self, allocation: FisherRankAllocation, trainer: Trainer | None = None):
        self.allocation, self.trainer = allocation, trainer
        self._scale = None  # fp16: the loss scale of the step's backward pass
        self.log = _Logger(trainer)
        _restore_on_adapter_load(allocation.model, self._restore)

    def _restore(self, checkpoint: str) -> None:
        if os.path.isfile(os.path.join(checkpoint, RANK_STATE_FILE)):
            self.allocation.load(checkpoint)  # past K: the model takes the saved ranks before its weights load
            if self.trainer is not None and not self.allocation.in_warmup:
                self.trainer.optimizer = None  # built anew over the resized parameters

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            raise MethodError("fwrank runs on one process in the Trainer: DDP keeps the parameters it wrapped, and "
                              "the resize replaces some (use fwlora train under torchrun for data parallelism)")
        self.allocation.start(state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._scale = _grad_scale(self.trainer)  # the backward pass's: the scaler's step may change it

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        if self.allocation.step(grad_scale=self._scale):
            refresh_optimizer(optimizer, self.allocation.model)
            self.log.add({f"fwrank_rank/{n.removeprefix('base_model.model.')}": float(r)
                          for n, r in self.allocation.ranks.items()})

    def on_step_end(self, args, state, control, **kwargs):
        if self.log.pending and not control.should_log:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.log.flush(logs)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.allocation.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


class FWRankTrainer(Trainer):
    """transformers.Trainer training a PEFT LoRA model with Fisher-guided rank allocation (FWRankCallback)."""

    def __init__(self, *args: Any, rank_config: FWRankConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError("FWRankTrainer runs on one process: DDP keeps the parameters it wrapped, and the "
                             "resize replaces some (use fwlora train under torchrun for data parallelism)")
        self.allocation = FisherRankAllocation(self.model, rank_config or FWRankConfig())
        self.add_callback(FWRankCallback(self.allocation, self))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.allocation.save(output_dir or self.args.output_dir)
