"""The faster bench at identical results: evaluation in length order with a larger batch gives the metrics of
file order; a task's data is tokenised once per process for all the runs that share it. And the decoder-sized
options: --dtype, --gradient-checkpointing (the same run, less memory), --load-in-4bit where it can run."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import tiny

from fwlora import models, train
from fwlora.cli import main
from fwlora.config import TrainConfig
from fwlora.tasks import get_task
from fwlora.tasks.glue import gather_logits
from fwlora.trainer import length_order


class _NoAccelerator:
    @staticmethod
    def gather_for_metrics(x):
        return x


def eval_logits(model, task, data, tokenizer, order, batch_size):
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=order,
                                         collate_fn=task.eval_collator(tokenizer))
    logits, labels = gather_logits(model, loader, _NoAccelerator())
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return logits[back.numpy()], labels[back.numpy()]


def check_orders(task, examples):
    torch.manual_seed(0)
    model, tokenizer = models.load_backbone("minilm", task, "mean")
    model.eval()
    data = task.encode_eval(examples, tokenizer, 128)
    file_logits, file_labels = eval_logits(model, task, data, tokenizer, list(range(len(data))), 32)
    sorted_logits, sorted_labels = eval_logits(model, task, data, tokenizer, length_order(data), 256)
    assert (file_labels == sorted_labels).all()
    assert task.metrics(file_labels, file_logits) == task.metrics(sorted_labels, sorted_logits)
    assert (file_logits.argmax(-1) == sorted_logits.argmax(-1)).all()
    assert abs(file_logits - sorted_logits).max() < 1e-5


def test_length_order_is_longest_first_and_a_permutation():
    data = [{"input_ids": [0] * n} for n in (3, 9, 1, 9, 4)]
    assert length_order(data) == [1, 3, 4, 0, 2]


def test_evaluation_in_length_order_gives_the_metrics_of_file_order(glue_dir):
    task = get_task("cola")
    _, examples, _ = task.load(glue_dir)
    check_orders(task, examples)


@pytest.mark.realdata
def test_the_same_on_real_cola(real_glue_dir):
    task = get_task("cola")
    _, examples, _ = task.load(real_glue_dir)
    check_orders(task, examples)


def test_a_task_is_tokenised_once_for_all_runs_that_share_it(glue_dir, monkeypatch):
    calls = []
    real = type(get_task("cola")).encode

    def counting(self, examples, tokenizer, max_length):
        calls.append(len(examples))
        return real(self, examples, tokenizer, max_length)

    monkeypatch.setattr(type(get_task("cola")), "encode", counting)
    train._PREPARED.clear()
    base = {"task": "cola", "data_dir": str(glue_dir), "train_limit": 32, "eval_limit": 16, "max_length": 16, "rank": 1}
    for method in ("lora", "fwlora"):
        train.setup(TrainConfig.from_dict({**base, "method": method, "fw_warmup_steps": 2}))
    train.setup(TrainConfig.from_dict({**base, "seed": 3}))
    assert calls == [32]  # three runs, one tokenisation of the training data


def test_bfloat16_weights_and_a_float32_head(tmp_path, glue_dir):
    model, _ = models.load_backbone("minilm", get_task("cola"), "mean", dtype="bfloat16")
    assert model.encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert model.classifier.weight.dtype == torch.float32
    out = tmp_path / "run"
    assert main(tiny(glue_dir, out, "--dtype", "bfloat16", "--mixed-precision", "bf16", "--report-to", "none")) == 0
    assert json.loads((out / "result.json").read_text())["config"]["dtype"] == "bfloat16"


def test_gradient_checkpointing_is_the_same_run(tmp_path, glue_dir):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert main(tiny(glue_dir, plain, "--report-to", "none", "--method", "fwlora", "--fw-warmup-steps", "1")) == 0
    assert main(tiny(glue_dir, ckpt, "--report-to", "none", "--method", "fwlora", "--fw-warmup-steps", "1",
                     "--gradient-checkpointing")) == 0
    a, b = (json.loads((d / "result.json").read_text()) for d in (plain, ckpt))
    assert a["final"]["loss"] == pytest.approx(b["final"]["loss"], rel=1e-5)
    fa = {m["name"]: m["fisher"] for m in a["matrices"]}
    fb = {m["name"]: m["fisher"] for m in b["matrices"]}
    assert fb == pytest.approx(fa, rel=1e-4)  # the warm-up hooks see the same x and g when activations are recomputed


def test_four_bit_loading_runs_or_says_why_not(tmp_path, glue_dir, capsys):
    reason = models.quantization_unavailable()
    out = tmp_path / "run"
    code = main(tiny(glue_dir, out, "--load-in-4bit", "--report-to", "none", "--method", "fwlora",
                     "--fw-warmup-steps", "1", "--model", "minilm"))
    if reason is not None:
        assert code == 2 and "--load-in-4bit needs bitsandbytes' 4-bit kernels" in capsys.readouterr().err
        pytest.skip(f"4-bit loading cannot run here: {reason}")
    assert code == 0
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "complete" and all(m["fisher"] > 0 for m in record["matrices"])
