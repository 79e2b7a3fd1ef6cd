"""The engine end to end: all three methods on a slice of real GLUE with the offline backbone, the
RoBERTa path on a tiny random RoBERTa, a sentence-pair task, determinism, and fairness (FW-LoRA with
lambda = 0 is LoRA, step for step)."""

from __future__ import annotations

import json

import pytest
import torch

from fwlora.config import TrainConfig
from fwlora.train import train

SMALL = dict(model="minilm", train_limit=96, eval_limit=64, max_length=32, batch_size=16, epochs=2, lr=1e-3,
             rank=2, fw_warmup_steps=4, eval_batch_size=64)


def run(tmp_path, name, **overrides):
    cfg = TrainConfig.from_dict({**SMALL, "output_dir": str(tmp_path / name), **overrides})
    return train(cfg).to_dict(), tmp_path / name


@pytest.fixture(scope="module")
def three_methods(tmp_path_factory, glue_dir):
    """A slice of the synthetic CoLA-format copy (conftest), so these run in any clone."""
    tmp = tmp_path_factory.mktemp("engine")
    return {m: run(tmp, m, method=m, task="cola", data_dir=str(glue_dir)) for m in ("lora", "adalora", "fwlora")}


def test_all_methods_complete_with_a_full_run_directory(three_methods):
    for method, (result, run_dir) in three_methods.items():
        assert result["status"] == "complete" and result["method"] == method
        assert [e["epoch"] for e in result["epochs"]] == [1, 2]
        assert result["data"]["train_examples"] == 96 and result["data"]["eval_examples"] == 64
        assert result["timing"]["optimizer_steps"] == 12 and result["timing"]["train_seconds"] > 0
        assert -1 <= result["final"]["mcc"] <= 1
        assert len(result["matrices"]) == 36
        on_disk = json.loads((run_dir / "result.json").read_text())
        assert on_disk["final"] == result["final"]
        assert (run_dir / "config.json").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
        assert not (run_dir / "checkpoint").exists()  # removed once the run is complete
        assert on_disk["env"]["packages"]["torch"] and "git_commit" in on_disk["env"]


def test_budget_and_head_are_recorded(three_methods):
    lora = three_methods["lora"][0]["budget"]
    assert lora["rank"] == 2 and lora["adapter_params"] == 2 * 41_472 and lora["head"] == "mean"
    assert lora["trainable_params"] == lora["adapter_params"] + lora["head_params"]
    ada = three_methods["adalora"][0]
    # AdaLoRA trains init_r = 3 triplets per matrix: 3 * (d_in + d_out) + 3 values of E
    assert ada["budget"]["adapter_trainable_params"] == 3 * 41_472 + 3 * 36
    info = ada["method_info"]  # release 1 kept AdaLoRA's block under "adalora"
    assert info["init_r"] == 3 and info["target_r"] == 2 and info["total_step"] == 12


def test_per_matrix_statistics(three_methods):
    lora_rows = three_methods["lora"][0]["matrices"]
    for row in lora_rows:
        assert row["numerical_rank"] <= 2 and 0 <= row["effective_rank"] <= 2 + 1e-6
        assert row["fro_norm"] == pytest.approx(sum(s * s for s in row["singular_values"]) ** 0.5, rel=1e-6)
    fw_rows = three_methods["fwlora"][0]["matrices"]
    importance = [r["importance"] for r in fw_rows]
    assert all(i is not None and i >= 0 for i in importance) and sum(importance) == pytest.approx(1.0)
    ada_rows = three_methods["adalora"][0]["matrices"]
    assert all(r["adalora_rank"] is not None for r in ada_rows)
    assert sum(r["adalora_rank"] for r in ada_rows) == 2 * 36  # the target budget: average rank r


def test_fw_lora_penalty_is_recorded_after_warmup(three_methods):
    result = three_methods["fwlora"][0]
    assert result["epochs"][1]["penalty"] > 0  # K = 4 of 12 steps: the penalty is on in epoch 2
    assert result["timing"]["warmup_step_seconds_median"] > 0  # release 1: fw_warmup_step_seconds_median


def test_fw_lora_with_zero_lambda_is_lora_step_for_step(tmp_path, glue_dir):
    lora, lora_dir = run(tmp_path, "lora", method="lora", task="cola", data_dir=str(glue_dir), epochs=1)
    fw, fw_dir = run(tmp_path, "fw", method="fwlora", task="cola", data_dir=str(glue_dir), epochs=1, lambda_fw=0.0)
    assert fw["final"]["mcc"] == lora["final"]["mcc"] and fw["final"]["loss"] == lora["final"]["loss"]
    from safetensors.torch import load_file

    a = load_file(str(lora_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(fw_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_same_seed_same_metrics_other_seed_differs(tmp_path, glue_dir):
    one, _ = run(tmp_path, "a", method="fwlora", task="cola", data_dir=str(glue_dir), epochs=1)
    two, _ = run(tmp_path, "b", method="fwlora", task="cola", data_dir=str(glue_dir), epochs=1)
    other, _ = run(tmp_path, "c", method="fwlora", task="cola", data_dir=str(glue_dir), epochs=1, seed=1)
    assert one["epochs"][0]["loss"] == two["epochs"][0]["loss"]
    assert one["final"] == {**two["final"], "train_seconds": one["final"]["train_seconds"]}
    assert one["matrices"] == two["matrices"]
    assert other["epochs"][0]["loss"] != one["epochs"][0]["loss"]


def write_pair_task(root, n_train=48, n_eval=24):
    folder = root / "rte"
    folder.mkdir(parents=True)
    words = ["red", "blue", "cat", "dog", "runs", "sleeps", "big", "small"]
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("validation", n_eval)):
        lines = ["sentence1\tsentence2\tlabel"]
        for i in range(n):
            a = " ".join(words[j] for j in torch.randint(0, 8, (5,), generator=gen).tolist())
            b = " ".join(words[j] for j in torch.randint(0, 8, (4,), generator=gen).tolist())
            lines.append(f"{a}\t{b}\t{i % 2}")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_sentence_pair_task_reports_f1(tmp_path):
    data = write_pair_task(tmp_path / "glue")
    result, _ = run(tmp_path, "pair", method="fwlora", task="rte", data_dir=str(data), train_limit=None,
                    eval_limit=None, epochs=1, fw_warmup_steps=1)
    assert set(result["final"]) >= {"accuracy", "mcc", "f1"} and result["metric"] == "accuracy"
    assert result["data"]["train_examples"] == 48


def test_roberta_path_on_a_tiny_random_roberta(tmp_path):
    """The code that loads roberta-base from the hub, on a tiny random RoBERTa saved to disk."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    from fwlora.models import resolve_backbone

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                           type_vocab_size=2)
    path = tmp_path / "tiny-roberta"
    RobertaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = write_pair_task(tmp_path / "glue")
    for method in ("lora", "adalora", "fwlora"):
        result, _ = run(tmp_path, f"rob-{method}", method=method, task="rte", model=str(path), data_dir=str(data),
                        train_limit=None, eval_limit=None, epochs=2, fw_warmup_steps=2, budget=0.5, rank=None)
        assert result["budget"]["head"] == "model" and result["status"] == "complete"
        assert len(result["matrices"]) == 12  # 6 matrix types x 2 layers, no head
        assert all(not r["name"].startswith("classifier") for r in result["matrices"])
