"""fwrank as it runs: the training loop resizes once within the budget (every rule), the "update" rule keeps
the truncated SVD of what each matrix learned, the state round-trips before and after the resize (PEFT's
own save / load), and two data-parallel gloo processes with half batches agree with one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import batch, lora, tiny_bert
from test_allocation import FF0, dw, logits

from fwlora import FWLoRAError
from fwlora.methods.fwrank import FisherRankAllocation, FWRankConfig, allocate_spectrum, refresh_optimizer
from fwlora.methods.gradients import find_lora_layers


# ---- the whole method in a loop, and its state -------------------------------------------------------

def run(model, fr, steps, opt, start=0):
    resized_at = []
    for step in range(start, start + steps):
        model.train()
        model(**batch(seed=step)).loss.backward()
        opt.step()
        if fr.step():
            resized_at.append(step + 1)
            refresh_optimizer(opt, model)
        opt.zero_grad()
    return resized_at


@pytest.mark.parametrize("rule", ["spectrum", "proportional", "update"])
def test_loop_resizes_once_within_the_budget(rule):
    model = lora(tiny_bert(), r=3)
    fr = FisherRankAllocation(model, FWRankConfig(target_rank=2, warmup_steps=3, rule=rule, r_max=6, measure_every=1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert run(model, fr, 5, opt) == [3]
    cost = {n: sum(d) for n, d in fr.dims.items()}
    assert fr.budget == 2 * sum(cost.values())
    used = sum(fr.ranks[n] * cost[n] for n in fr.names)
    assert used <= fr.budget and fr.param_counts["after"] == used
    live = find_lora_layers(model)
    assert {n: live[n].r["default"] if n in live else 0 for n in fr.names} == fr.ranks
    if rule == "spectrum":  # nothing else fits: the largest allocation the greedy order allows
        assert all(fr.ranks[n] == 6 or cost[n] > fr.budget - used for n in fr.names)
        assert sorted(fr.gains[FF0], reverse=True) == fr.gains[FF0] and len(fr.gains[FF0]) == 16
    over = fr.trained_params_over_run(5)
    assert over["mean"] == pytest.approx((3 * over["warmup"] + 2 * over["after"]) / 5)


def test_update_rule_ranks_the_learned_update_and_keeps_its_top_directions():
    """rule="update": the gains are sigma_k^2 of s B A at step K (torch.linalg.svd of the materialised
    float64 product), at most the warm-up rank per matrix; every kept matrix becomes the truncated SVD of
    what it had learned, and the budget is that of the target rank."""
    model = lora(tiny_bert(), r=3)
    fr = FisherRankAllocation(model, FWRankConfig(target_rank=2, warmup_steps=3, rule="update", r_max=6,
                                                  measure_every=1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run(model, fr, 2, opt)
    model.train()
    model(**batch(seed=2)).loss.backward()
    opt.step()
    learned = {n: dw(m) for n, m in find_lora_layers(model).items()}  # the K-th update included
    assert fr.step()
    refresh_optimizer(opt, model)
    cost = {n: sum(d) for n, d in fr.dims.items()}
    for n, delta in learned.items():
        sigma = torch.linalg.svd(delta).S
        assert fr.gains[n] == pytest.approx((sigma[:3] ** 2).tolist(), rel=1e-9)
    assert allocate_spectrum(fr.gains, cost, fr.budget, 3) == fr.ranks  # the greedy, capped at the warm-up rank
    assert max(fr.ranks.values()) <= 3 and sum(fr.ranks[n] * cost[n] for n in fr.names) <= fr.budget
    assert len(set(fr.ranks.values())) > 1  # it did move the budget on this model
    live = find_lora_layers(model)
    for n, r in fr.ranks.items():
        if r:
            u, sigma, vh = torch.linalg.svd(learned[n])
            assert torch.allclose(dw(live[n]), (u[:, :r] * sigma[:r]) @ vh[:r], atol=1e-6)


def test_state_round_trip_mid_warmup(tmp_path):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    config = FWRankConfig(target_rank=2, warmup_steps=4, sketch_size=3, seed=1, measure_every=1)
    model = lora(tiny_bert(), r=3)
    fr = FisherRankAllocation(model, config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    run(model, fr, 2, opt)
    fr.save(tmp_path)
    fresh = lora(tiny_bert(), r=3)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    fr2 = FisherRankAllocation.from_pretrained(fresh, tmp_path)
    assert fr2.steps_done == 2 and fr2.fisher == pytest.approx(fr.fisher, rel=1e-12)
    opt2 = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=0.5)
    assert run(model, fr, 2, opt, start=2) == run(fresh, fr2, 2, opt2, start=2) == [4]
    assert fr2.ranks == fr.ranks
    for n in fr.names:
        assert fr2.gains[n] == pytest.approx(fr.gains[n], rel=1e-9, abs=1e-25)


def test_state_round_trip_after_the_resize(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    config = FWRankConfig(target_rank=1, warmup_steps=2, sketch_size=2, measure_every=1)
    model = lora(tiny_bert(), r=2)
    fr = FisherRankAllocation(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run(model, fr, 3, opt)
    assert 0 in fr.ranks.values()
    fr.save(tmp_path / "state")
    model.save_pretrained(tmp_path / "adapter")
    expected, shapes = logits(model), {n: p.shape for n, p in model.named_parameters()}
    # a fresh model at the warm-up shapes: loading re-applies the ranks, then the weights load into them
    fresh = lora(tiny_bert(), r=2)
    fr2 = FisherRankAllocation.from_pretrained(fresh, tmp_path / "state")
    assert fr2.ranks == fr.ranks and fr2.fisher == fr.fisher and not fr2.in_warmup
    assert {n: p.shape for n, p in fresh.named_parameters()} == shapes
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=1e-12)
    # a model rebuilt from the saved adapter already has these shapes: loading touches nothing
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter", is_trainable=True)
    fr3 = FisherRankAllocation.from_pretrained(loaded, tmp_path / "state")
    assert fr3.last_resize.new == [] and fr3.last_resize.removed == []
    assert fr3.step() is False
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-12)
    mid = FisherRankAllocation(lora(tiny_bert(), r=2), config).state_dict()
    with pytest.raises(FWLoRAError, match="warm-up shapes"):  # a mid-warm-up state needs the warm-up model
        FisherRankAllocation(loaded, config).load_state_dict(mid)


# ---- data parallelism: two gloo processes, each with half of the batch -------------------------------

def _dp_run(rank: int, world: int) -> tuple[dict, dict]:
    model = lora(tiny_bert(), r=3)
    fr = FisherRankAllocation(model, FWRankConfig(target_rank=2, warmup_steps=2, sketch_size=3, r_max=5, measure_every=1))
    tensors = {}
    for step in range(2):
        full = batch(n=8, seed=step)
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()} if world == 2 else full
        model(**half).loss.backward()  # no optimizer step: the processes' models stay identical
        if step == 0:
            fr.step()
            tensors |= {f"m:{n}": m.clone() for n, m in fr.moments.items()}
        else:
            torch.manual_seed(100 + rank)  # processes whose RNGs differ still get the same fresh directions
            assert fr.step()
    tensors |= {f"a:{n}": layer.lora_A["default"].weight.detach().clone() for n, layer in fr.layers.items()}
    return tensors, fr.ranks


def _dp_worker(rank: int, world: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        tensors, ranks = _dp_run(rank, world)
        save_file(tensors, f"{out}/rank{rank}.safetensors")
        Path(f"{out}/rank{rank}.json").write_text(json.dumps(ranks))
        dist.barrier()  # neither process tears gloo down while the other still talks to it (a SIGABRT in CI)
    finally:
        dist.destroy_process_group()


def test_two_processes_with_half_batches_agree_with_one(tmp_path):
    import json

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_dp_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    (r0, r1), (ranks0, ranks1) = ([load_file(tmp_path / f"rank{k}.safetensors") for k in (0, 1)],
                                  [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)])
    one, ranks_one = _dp_run(0, 1)
    assert ranks0 == ranks1 == ranks_one
    for key, value in one.items():
        if key.startswith("m:"):  # the statistic of the global batch, on every process
            torch.testing.assert_close(r0[key], value, rtol=1e-6, atol=1e-16)
            torch.testing.assert_close(r1[key], r0[key], rtol=0, atol=0)
        else:  # fresh directions are drawn once (process 0's) and shared
            torch.testing.assert_close(r1[key], r0[key], rtol=0, atol=0)
