"""A bfloat16/float16 backbone with the architecture's own head (head=model): training without autocast,
load_run + predict and export --merged work, and the logits match the same model computed in float32;
predict's --device; a 4-bit backbone's device map per local rank.

Tiny random models (a LLaMA decoder and a BERT encoder, hidden 32) with MiniLM's tokenizer, saved as local
checkpoints with their heads, so that every load of a checkpoint holds the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import tiny

from fwlora import backbones, load_run, models
from fwlora.cli import main
from fwlora.errors import UserError
from fwlora.inference import export_run, predict, prediction_inputs, resolve_device

TEXTS = ["the film was good", "a dull and boring book that never ends", "the city at night"]


def save_tiny(path, arch: str):
    from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig,
                              LlamaForSequenceClassification)

    tokenizer = AutoTokenizer.from_pretrained(backbones.resolve_backbone("minilm"))
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, num_labels=2)
        model = LlamaForSequenceClassification(config)
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                         num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=64, num_labels=2))
    with torch.no_grad():  # a head that is not near zero, so that its precision shows in the logits
        for name, p in model.named_parameters():
            if models._is_head(name):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama", "bert"])
def checkpoint(request, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp(request.param) / "model", request.param)


def logits_of(model, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def assert_bf16_close(got, expected):
    """bfloat16 keeps 8 significant bits: 2 layers and a head stay within a few per cent of the logits' scale."""
    assert got.dtype == torch.float32
    tol = 0.03 * float(expected.abs().max())
    assert (got - expected).abs().max() <= tol, (got, expected)
    assert not torch.equal(got, expected)  # the premise: the backbone really ran in low precision


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_low_precision_backbone_keeps_a_float32_head_and_matches_float32(checkpoint, dtype):
    from peft import LoraConfig, get_peft_model

    model, tok = models.load_backbone(str(checkpoint), 2, "model", dtype=dtype)
    reference, _ = models.load_backbone(str(checkpoint), 2, "model")  # the same weights, float32 throughout
    heads = {n: p.dtype for n, p in model.named_parameters() if models._is_head(n)}
    assert heads and set(heads.values()) == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not models._is_head(n)} == {models.DTYPES[dtype]}
    assert_bf16_close(logits_of(model.eval(), tok), logits_of(reference.eval(), tok))
    # one training step's gradient of the head, without autocast, against float32's
    grads = []
    for m in (model, reference):
        config = LoraConfig(r=2, target_modules=models.resolve_targets(m), modules_to_save=models.head_modules(m))
        peft = get_peft_model(m, config)
        batch = tok(TEXTS, padding=True, return_tensors="pt")
        peft(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
        grads.append({n: p.grad for n, p in peft.named_parameters() if p.requires_grad and models._is_head(n)})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert g.dtype == torch.float32
        assert (g - grads[1][n]).abs().max() <= 0.05 * grads[1][n].abs().max() + 1e-6, n


@pytest.fixture(scope="module")
def bf16_run(checkpoint, tmp_path_factory, glue_dir):
    out = tmp_path_factory.mktemp("runs") / "bf16"
    assert main(tiny(glue_dir, out, "--model", str(checkpoint), "--head", "model", "--dtype", "bfloat16",
                     "--report-to", "none", "--lr", "5e-3")) == 0  # no autocast: --mixed-precision no
    return out


def float32_reference(run_dir):
    """The trained run in float32: its backbone loaded in float32 and its adapter (head included) by PEFT."""
    from peft import PeftModel

    run = load_run(run_dir)
    base, _ = models.load_backbone(run.config.model, 2, "model")
    return PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()


def test_a_bf16_run_predicts_and_exports_what_float32_computes(bf16_run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = load_run(bf16_run)
    assert next(run.model.base_model.model.parameters()).dtype == torch.bfloat16
    expected = logits_of(float32_reference(bf16_run), run.tokenizer)
    assert_bf16_close(logits_of(run.model, run.tokenizer).float(), expected)
    rows = predict(run, TEXTS, batch_size=2)
    probs = torch.tensor([[r["probabilities"]["0"], r["probabilities"]["1"]] for r in rows])
    assert (probs - torch.softmax(expected, -1)).abs().max() < 0.02
    assert main(["predict", str(bf16_run), "--device", "cpu", "--limit", "4"]) == 0  # failed before: fp32 head
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]) == 4

    out = export_run(bf16_run, tmp_path / "merged", merged=True)
    plain = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert_bf16_close(logits_of(plain, AutoTokenizer.from_pretrained(out)), expected)


def test_predict_on_the_cpu_device_gives_the_same_predictions(bf16_run, capsys):
    run = load_run(bf16_run)  # the path before --device: loaded where it loads, the CPU
    inputs, _, _ = prediction_inputs(run)
    before = predict(run, inputs, batch_size=5)
    assert main(["predict", str(bf16_run), "--device", "cpu", "--batch-size", "5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["label"] for r in rows] == [b["label"] for b in before]
    assert [r["p_1"] for r in rows] == [b["probabilities"]["1"] for b in before]


def test_device_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu9", "gpu"):
        with pytest.raises(UserError, match="use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")


def test_a_4bit_backbone_loads_on_each_process_s_own_gpu(monkeypatch):
    assert models.quantized_device_map(3, cuda=True) == {"": 3}
    assert models.quantized_device_map(0, cuda=False) == {"": "cpu"}
    import accelerate

    class Rank:  # what Accelerate says under torchrun on the second GPU of a node (a later node's rank 5)
        local_process_index, process_index = 1, 5

    monkeypatch.setattr(accelerate, "PartialState", Rank)
    monkeypatch.setattr(models, "quantization_unavailable", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.precision_kwargs("bfloat16", True)["device_map"] == {"": 1}
