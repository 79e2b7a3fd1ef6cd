"""The Hugging Face Trainer integration: same Fisher as the plain loop, penalty scaled correctly under
gradient accumulation, state saved with checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, lora, tiny_bert

from fwlora import FisherWeightedLoRA, FWLoRAConfig
from fwlora.methods.fwlora import STATE_FILE


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, b):
        self.rows = [{k: v[i] for k, v in b.items()} for i in range(len(b["labels"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def run_trainer(tmp_path, accumulation: int, steps: int, warmup: int, lam: float = 5.0):
    from transformers import TrainingArguments

    from fwlora.hf import FWLoRATrainer

    data = ListDataset(batch(n=16 * steps, seed=1))
    model = lora(tiny_bert(dtype=torch.float32))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16 // accumulation,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=0.05,
                             lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_drop_last=True,
                             disable_tqdm=True, weight_decay=0.0)
    trainer = FWLoRATrainer(model=model, args=args, train_dataset=data,
                            fw_config=FWLoRAConfig(warmup_steps=warmup, lambda_fw=lam, estimator="exact"))
    trainer.train()
    return trainer


def plain_loop(steps: int, warmup: int, lam: float = 5.0):
    """The same training written by hand (AdamW, constant lr, batches of 16 in order)."""
    torch.manual_seed(0)
    model = lora(tiny_bert(dtype=torch.float32))
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=warmup, lambda_fw=lam, estimator="exact"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.0)
    data = batch(n=16 * steps, seed=1)
    return model, fw, opt, data


def test_trainer_matches_accumulation_and_applies_penalty(tmp_path):
    one = run_trainer(tmp_path / "a", accumulation=1, steps=4, warmup=2)
    two = run_trainer(tmp_path / "b", accumulation=2, steps=4, warmup=2)
    assert one.fw.steps_done == 4 and two.fw.steps_done == 4
    assert two.fw.fisher == pytest.approx(one.fw.fisher, rel=1e-4)
    assert one.fw.penalty().item() > 0
    p1 = {n: p for n, p in one.model.named_parameters() if "lora_" in n}
    p2 = {n: p for n, p in two.model.named_parameters() if "lora_" in n}
    for n in p1:  # the same updates, penalty included, whether or not the batch is split
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-3, atol=1e-5)


def test_penalty_changes_the_trajectory(tmp_path):
    """The test above can fail: with lambda = 0 the adapters after warm-up differ."""
    with_penalty = run_trainer(tmp_path / "a", accumulation=1, steps=4, warmup=2, lam=5.0)
    without = run_trainer(tmp_path / "b", accumulation=1, steps=4, warmup=2, lam=0.0)
    diffs = [(p - q).abs().max().item() for (n, p), (_, q) in
             zip(with_penalty.model.named_parameters(), without.model.named_parameters()) if "lora_B" in n]
    assert max(diffs) > 1e-4


def test_save_model_writes_the_fw_state(tmp_path):
    trainer = run_trainer(tmp_path / "a", accumulation=1, steps=2, warmup=1)
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / STATE_FILE).is_file()
    assert (tmp_path / "out" / "adapter_config.json").is_file()


@pytest.mark.parametrize("script", ["plain_loop.py", "hf_trainer.py"])
def test_readme_examples_run(script, glue_dir, tmp_path):
    """The runnable examples the README points to, at a few steps."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / script
    cmd = [sys.executable, str(path), "--data-dir", str(glue_dir), "--steps", "6", "--warmup-steps", "3"]
    if script == "hf_trainer.py":
        cmd += ["--output-dir", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "most important matrices:" in done.stdout
    if script == "hf_trainer.py":
        assert (tmp_path / "out" / STATE_FILE).is_file()


# ---- fwrank in the Trainer ------------------------------------------------------------------------------


def run_rank_trainer(tmp_path, steps: int, warmup: int, **kw):
    from transformers import TrainingArguments

    from fwlora import FWRankConfig
    from fwlora.hf import FWRankTrainer

    torch.manual_seed(0)
    model = lora(tiny_bert(dtype=torch.float32), init_b=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=steps,
                             learning_rate=0.05, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
                             logging_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_drop_last=True,
                             disable_tqdm=True, weight_decay=0.0, **kw)
    config = FWRankConfig(target_rank=2, warmup_steps=warmup, sketch_size=0, r_max=4, measure_every=1)
    trainer = FWRankTrainer(model=model, args=args, train_dataset=ListDataset(batch(n=16 * steps, seed=1)),
                            rank_config=config)
    return trainer, config


def test_rank_trainer_reallocates_once_and_trains_the_new_shapes(tmp_path):
    """Resized once, after the K-th optimizer step, within the budget; the Trainer's optimizer then holds
    exactly the model's parameters: those the resize kept carry state from step 1, the new ones from K+1."""
    trainer, _ = run_rank_trainer(tmp_path / "t", steps=5, warmup=2)
    before = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    a = trainer.allocation
    assert a.ranks and a.steps_done == 2
    assert sum(r * sum(a.dims[n]) for n, r in a.ranks.items()) <= a.budget
    assert a.last_resize.new, "the tiny model's allocation changes some ranks"
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in params.values()}
    for n, p in params.items():
        if "lora_" not in n:
            continue
        steps = int(optimizer.state[p]["step"])
        assert steps == (5 if before.get(n) is p else 3), n  # kept: every step; new: the 3 after K = 2


def test_rank_trainer_saves_and_resumes_past_the_resize(tmp_path):
    from fwlora.methods.fwrank import RANK_STATE_FILE

    straight, _ = run_rank_trainer(tmp_path / "a", steps=6, warmup=2, save_strategy="no")
    straight.train()
    first, _ = run_rank_trainer(tmp_path / "b", steps=6, warmup=2, save_strategy="steps", save_steps=3)
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / RANK_STATE_FILE).is_file()
    resumed, _ = run_rank_trainer(tmp_path / "b", steps=6, warmup=2, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.allocation.ranks == straight.allocation.ranks
    a = {n: p for n, p in straight.model.named_parameters() if "lora_" in n}
    b = {n: p for n, p in resumed.model.named_parameters() if "lora_" in n}
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6)


# ---- the callbacks alone: a plain Trainer subclass, TRL's SFTTrainer ------------------------------------------


def own_trainer(tmp_path, callback_for, steps=6, save_steps=None, model=None, cls=None, **kw):
    from transformers import Trainer, TrainingArguments

    class UserTrainer(Trainer):  # a subclass of the user's, with nothing of fwlora in it
        pass

    torch.manual_seed(0)
    model = model or lora(tiny_bert(dtype=torch.float32), init_b=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=steps,
                             learning_rate=0.05, lr_scheduler_type="constant", max_grad_norm=1.0, report_to=[],
                             logging_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_drop_last=True,
                             disable_tqdm=True, weight_decay=0.0, save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 500, **kw)
    trainer = (cls or UserTrainer)(model=model, args=args, train_dataset=ListDataset(batch(n=16 * steps, seed=1)))
    trainer.add_callback(callback_for(model, trainer))
    return trainer


def fw_callback(config):
    from fwlora.hf import FWLoRACallback

    return lambda model, trainer: FWLoRACallback(FisherWeightedLoRA(model, config), trainer)


def rank_callback(config):
    from fwlora import FisherRankAllocation
    from fwlora.hf import FWRankCallback

    return lambda model, trainer: FWRankCallback(FisherRankAllocation(model, config), trainer)


def lora_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind", ["fwlora", "fwrank"])
def test_the_callback_alone_on_a_user_trainer_resumes_to_the_uninterrupted_result(tmp_path, kind):
    from fwlora import FWRankConfig

    if kind == "fwlora":  # K as a fraction of the run: 0.5 of 6 steps = 3; the penalty from step 4 on
        make = fw_callback(FWLoRAConfig(warmup_steps=0.5, lambda_fw=2.0, estimator="exact", measure_every=1))
    else:
        make = rank_callback(FWRankConfig(target_rank=2, warmup_steps=0.5, sketch_size=0, r_max=4, measure_every=1))
    straight = own_trainer(tmp_path / "a", make)
    straight.train()
    first = own_trainer(tmp_path / "b", make, save_steps=4)
    first.train()
    resumed = own_trainer(tmp_path / "b", make)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    state = straight.callback_handler.callbacks[-1]
    again = resumed.callback_handler.callbacks[-1]
    if kind == "fwlora":
        assert state.fw.config.warmup_steps == 3 and state.fw.penalty().item() > 0
        assert again.fw.fisher == pytest.approx(state.fw.fisher, rel=1e-9)
    else:
        assert state.allocation.config.warmup_steps == 3 and again.allocation.ranks == state.allocation.ranks
    a, b = lora_weights(straight), lora_weights(resumed)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6)


def test_the_fw_callback_adds_the_penalty_s_gradient(tmp_path):
    """lambda = 0 and lambda > 0 give the same weights through the warm-up (checkpoint at K = 3) and part after."""
    from safetensors.torch import load_file

    free = own_trainer(tmp_path / "a", fw_callback(FWLoRAConfig(warmup_steps=3, lambda_fw=0.0, estimator="exact")),
                       save_steps=3)
    free.train()
    paid = own_trainer(tmp_path / "b", fw_callback(FWLoRAConfig(warmup_steps=3, lambda_fw=50.0, estimator="exact")),
                       save_steps=3)
    paid.train()
    a, b = (load_file(str(tmp_path / d / "checkpoint-3" / "adapter_model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # no penalty in the warm-up
    a, b = lora_weights(free), lora_weights(paid)
    assert any(not torch.allclose(a[n], b[n]) for n in a)


def test_penalty_gradients_equal_autograd_of_the_penalty_in_the_loss():
    model = lora(tiny_bert())
    fw = FisherWeightedLoRA(model, FWLoRAConfig(warmup_steps=1, lambda_fw=3.0, estimator="exact"))
    model(**batch()).loss.backward()
    fw.step()
    model.zero_grad()
    fw.add_penalty_gradients()
    closed = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    model.zero_grad()
    fw.penalty().backward()
    for n, p in model.named_parameters():
        if n in closed:
            torch.testing.assert_close(closed[n], p.grad, rtol=1e-12, atol=1e-15)


def test_an_unreachable_warmup_is_refused_before_training(tmp_path):
    from fwlora.errors import MethodError

    trainer = own_trainer(tmp_path, fw_callback(FWLoRAConfig(warmup_steps=10)), steps=4)
    with pytest.raises(MethodError, match="warmup_steps = 10 >= the run's 4 optimizer steps"):
        trainer.train()
    assert not any(p.grad is not None for p in trainer.model.parameters())


def test_trl_sft_trainer_takes_the_callback_and_resumes(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed")
    from test_instruct import save_tiny_decoder, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from fwlora import FWRankConfig

    def decoder():
        from peft import LoraConfig, get_peft_model

        path = save_tiny_decoder(tmp_path / "llama", "llama") if not (tmp_path / "llama").is_dir() else tmp_path / "llama"
        torch.manual_seed(0)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=3, lora_alpha=6,
                              target_modules=["q_proj", "v_proj", "down_proj"]))

    from datasets import Dataset

    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "the cat"}],
                               "completion": [{"role": "assistant", "content": "sat on the mat"}]}] * 48)

    def run(out, resume=None, save_steps=None):
        model = decoder()
        args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=8, max_steps=6, learning_rate=0.05,
                             lr_scheduler_type="constant", report_to=[], logging_strategy="no", use_cpu=True, seed=0,
                             data_seed=0, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             disable_tqdm=True, max_length=32)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tiny_tokenizer(True))
        from fwlora import FisherRankAllocation
        from fwlora.hf import FWRankCallback

        trainer.add_callback(FWRankCallback(FisherRankAllocation(trainer.model, FWRankConfig(
            target_rank=2, warmup_steps=2, sketch_size=0, r_max=4, measure_every=1)), trainer))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "a")
    run(tmp_path / "b", save_steps=4)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-4"))
    a, b = lora_weights(straight), lora_weights(resumed)
    assert a.keys() == b.keys() and any(a[n].shape[0] != 3 for n in a if "lora_A" in n)  # resized from rank 3
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-6)


def test_the_fw_callback_under_an_fp16_grad_scaler_trains_as_without_one(tmp_path, monkeypatch):
    """A GradScaler of 2^10 scales the loss and every gradient exactly (a power of two), and unscales them: the
    training must be the unscaled one to the bit. The penalty's gradient goes in after the Trainer unscaled .grad,
    so it must not carry the scale (it did: 1024x here, 65,536x at fp16's default scale)."""
    from accelerate import Accelerator
    from accelerate.utils import AutocastKwargs

    make = fw_callback(FWLoRAConfig(warmup_steps=2, lambda_fw=50.0, estimator="exact", measure_every=1))
    plain = own_trainer(tmp_path / "a", make)
    plain.train()
    scaled = own_trainer(tmp_path / "b", make)
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))  # as on a GPU
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6)
    scaled.accelerator.scaler, scaled.accelerator.native_amp = scaler, True
    scaled.accelerator.autocast_handler = AutocastKwargs(enabled=False)  # the scaling alone, in float32
    scaled.train()
    assert scaler.get_scale() == 2.0**10  # it scaled every step, and none overflowed
    state, again = (t.callback_handler.callbacks[-1].fw for t in (plain, scaled))
    assert again.fisher == state.fisher and state.penalty().item() > 0
    a, b = lora_weights(plain), lora_weights(scaled)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
