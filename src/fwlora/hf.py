"""FW-LoRA and fwrank in the Hugging Face Trainer.

    from fwlora.hf import FWLoRATrainer
    trainer = FWLoRATrainer(model=peft_model, args=TrainingArguments(...), train_dataset=...,
                            fw_config=FWLoRAConfig(lambda_fw=1e-4, warmup_steps=500))
    trainer.train()                      # trainer.fw.importance after warm-up

FWLoRATrainer adds fw.penalty() to the loss (scaled for gradient accumulation exactly as the Trainer
scales the loss), calls fw.step() once per optimizer step through FWLoRACallback, and saves / restores
the FW-LoRA state with the Trainer's checkpoints and next to the saved adapter.

    from fwlora.hf import FWRankTrainer
    trainer = FWRankTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=...,
                            rank_config=FWRankConfig(target_rank=2, warmup_steps=200))
    trainer.train()                      # trainer.allocation.ranks after step K

FWRankTrainer measures during the first K optimizer steps, reallocates the ranks once after the K-th
optimizer step (FWRankCallback.on_optimizer_step), hands the Trainer's optimizer the new parameters
(state kept where shapes allow; the schedule goes on), and saves / restores the allocation with the
checkpoints and next to the adapter (a resumed run is resized before its weights load).
Under several processes (DDP) the Trainer's wrapped model keeps the old parameters: use one process.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from fwlora.allocation import RANK_STATE_FILE, FisherRankAllocation, FWRankConfig, refresh_optimizer
from fwlora.method import STATE_FILE, FisherWeightedLoRA, FWLoRAConfig


class FWLoRACallback(TrainerCallback):
    """Closes each optimizer step for FW-LoRA (after backward and clipping, before optimizer.step()) and
    saves its state into every checkpoint. Use it alone if your own Trainer subclass adds fw.penalty()."""

    def __init__(self, fw: FisherWeightedLoRA, trainer: Trainer | None = None):
        self.fw = fw
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        self.fw.step(grad_scale=scaler.get_scale() if scaler is not None else None)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.fw.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


def _per_sequence_loss(model: Any) -> bool:
    inner = model
    while hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return type(inner).__name__.endswith("ForSequenceClassification")


class FWLoRATrainer(Trainer):
    """transformers.Trainer training a PEFT LoRA model with FW-LoRA."""

    def __init__(self, *args: Any, fw_config: FWLoRAConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if _per_sequence_loss(self.model):
            # transformers#47688: sequence-classification heads accept **kwargs but ignore num_items_in_batch,
            # so the Trainer would skip dividing their mean loss by the accumulation steps (an inflated
            # gradient with accumulation). Their loss is a per-batch mean: let the Trainer divide it.
            self.model_accepts_loss_kwargs = False
        self.fw = FisherWeightedLoRA(self.model, fw_config or FWLoRAConfig())
        self.add_callback(FWLoRACallback(self.fw, self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_and_outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss, outputs = loss_and_outputs
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

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint:
            path = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            if path and os.path.isfile(os.path.join(path, STATE_FILE)):
                self.fw.load(path)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.fw.save(output_dir or self.args.output_dir)


class FWRankCallback(TrainerCallback):
    """Closes each optimizer step for fwrank, after optimizer.step(): at step K the model is resized and
    the Trainer's optimizer takes the new parameters. Saves the allocation into every checkpoint."""

    def __init__(self, allocation: FisherRankAllocation, trainer: Trainer | None = None):
        self.allocation = allocation
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        scaler = getattr(getattr(self.trainer, "accelerator", None), "scaler", None)
        if self.allocation.step(grad_scale=scaler.get_scale() if scaler is not None else None):
            refresh_optimizer(optimizer, self.allocation.model)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.allocation.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


class FWRankTrainer(Trainer):
    """transformers.Trainer training a PEFT LoRA model with Fisher-guided rank allocation."""

    def __init__(self, *args: Any, rank_config: FWRankConfig | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError("FWRankTrainer runs on one process: DDP keeps the parameters it wrapped, and the "
                             "resize replaces some (use fwlora train under torchrun for data parallelism)")
        self.allocation = FisherRankAllocation(self.model, rank_config or FWRankConfig())
        self.add_callback(FWRankCallback(self.allocation, self))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint:
            path = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
            if path and os.path.isfile(os.path.join(path, RANK_STATE_FILE)):
                self.allocation.load(path)  # past K: the model takes the saved ranks before its weights load
                self.optimizer = None  # built anew over the resized parameters
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.allocation.save(output_dir or self.args.output_dir)
