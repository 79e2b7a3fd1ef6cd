"""Use what you trained: load_run / predict give back the run's own evaluation metrics on the same examples;
a merged export gives the adapter model's logits (1e-5) and loads without fwlora; fwrank's non-uniform ranks
survive the round trip; bad input is one line. On MiniLM (mean pooling), a tiny model with its own head, a
tiny decoder, and the offline SmolLM2 and MPNet where they are installed."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import error_line, tiny
from test_instruct import save_tiny_decoder, write_jsonl

from fwlora import backbones, load_run
from fwlora.cli import main
from fwlora.inference import export_run, predict, prediction_inputs, score


def trained(tmp_path_factory, glue_dir, name: str, *extra: str):
    out = tmp_path_factory.mktemp("runs") / name
    args = tiny(glue_dir, out, "--epochs", "2", "--report-to", "none", *extra)
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, glue_dir):
    return trained(tmp_path_factory, glue_dir, "lora")


@pytest.fixture(scope="module")
def fwrank_run(tmp_path_factory, glue_dir):
    return trained(tmp_path_factory, glue_dir, "fwrank", "--method", "fwrank", "--fwrank-warmup-steps", "2",
                   "--fwrank-measure-every", "1", "--rank", "2", "--fwrank-r-max", "4")


def recorded(run_dir):
    return json.loads((run_dir / "result.json").read_text())


@pytest.mark.parametrize("which", ["lora_run", "fwrank_run"])
def test_predictions_on_the_evaluation_data_give_the_recorded_metrics(request, which):
    run_dir = request.getfixturevalue(which)
    run = load_run(run_dir)
    inputs, labels, source = prediction_inputs(run)
    rows = predict(run, inputs, batch_size=5)  # another batching than the evaluation's: the same predictions
    metrics = score(run, rows, labels)
    final = recorded(run_dir)["final"]
    assert metrics["accuracy"] == pytest.approx(final["accuracy"], abs=1e-12)
    assert metrics["mcc"] == pytest.approx(final["mcc"], abs=1e-12)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


def test_fwrank_non_uniform_ranks_survive_the_round_trip(fwrank_run):
    ranks = recorded(fwrank_run)["method_info"]["ranks"]
    assert len(set(ranks.values())) > 1, "the tiny run's allocation is not uniform"
    run = load_run(fwrank_run)
    from peft.tuners.lora.layer import LoraLayer

    loaded = {n.removeprefix("base_model.model."): int(m.r["default"]) for n, m in run.model.named_modules()
              if isinstance(m, LoraLayer) and "classifier" not in n}
    assert loaded == {n: r for n, r in ranks.items() if r > 0}


def test_loading_for_training_restores_the_method_s_own_state(lora_run, fwrank_run):
    """fwrank's allocation comes back from its state file (through the registry's hook) with the ranks the run
    recorded; plain LoRA has no state beyond the adapter."""
    from fwlora.methods.fwrank import FisherRankAllocation

    state = load_run(fwrank_run, for_training=True).method_state
    assert isinstance(state, FisherRankAllocation)
    assert {n.removeprefix("base_model.model."): r for n, r in state.ranks.items()} == recorded(fwrank_run)["method_info"]["ranks"]
    assert load_run(lora_run, for_training=True).method_state is None


def test_the_cli_writes_a_csv_and_prints_the_recorded_metrics(lora_run, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(lora_run), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    final = recorded(lora_run)["final"]
    assert f"accuracy {final['accuracy']:.4f}" in err and f"mcc {final['mcc']:.4f}" in err
    lines = out.read_text().splitlines()
    assert lines[0] == "text,label,p_0,p_1" and len(lines) == 17


def test_predict_refuses_an_unfinished_run_and_a_missing_column(lora_run, tmp_path, capsys):
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text((lora_run / "config.json").read_text())
    assert main(["predict", str(half)]) == 2
    assert "the run did not complete" in error_line(capsys)
    table = tmp_path / "new.csv"
    table.write_text("body\nsome text\n")
    assert main(["predict", str(lora_run), "--dataset", str(table), "--text-columns", "sentence"]) == 2
    assert "no column 'sentence' (--text-columns); its columns are body" in error_line(capsys)


def logits_of(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def test_a_merged_mean_pooling_export_loads_with_sentence_transformers_and_five_lines(lora_run, tmp_path):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    out = export_run(lora_run, tmp_path / "merged", merged=True)
    run = load_run(lora_run)
    texts = ["the film was good", "a dull and boring book", "the city at night"]
    expected = logits_of(run.model, run.tokenizer, texts)
    # the README's five-line loader
    encoder = SentenceTransformer(str(out), device="cpu")
    head = load_file(str(out / "classifier.safetensors"))
    logits = encoder.encode(texts, convert_to_tensor=True) @ head["weight"].T + head["bias"]
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()
    adapter = export_run(lora_run, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer_config.json").is_file()


def test_a_model_with_its_own_head_merges_into_a_plain_transformers_model(tmp_path, glue_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(backbones.resolve_backbone("minilm"))
    torch.manual_seed(0)
    path = tmp_path / "tiny-bert"
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    run_dir = tmp_path / "run"
    assert main(tiny(glue_dir, run_dir, "--model", str(path), "--report-to", "none", "--lr", "5e-3")) == 0
    out = export_run(run_dir, tmp_path / "merged", merged=True)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    run = load_run(run_dir)
    texts = ["good film", "bad book here"]
    assert torch.allclose(logits_of(plain, AutoTokenizer.from_pretrained(out), texts),
                          logits_of(run.model, run.tokenizer, texts), atol=1e-5)


def test_a_decoder_run_generates_and_merges_into_a_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    model = save_tiny_decoder(tmp_path / "llama", "llama")
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "the cat", "answer": "sat on the mat"}] * 16)
    run_dir = tmp_path / "run"
    assert main(["train", "--model", str(model), "--dataset", str(data), "--prompt-column", "prompt",
                 "--response-column", "answer", "--epochs", "1", "--batch-size", "8", "--rank", "1", "--threads", "1",
                 "--report-to", "none", "--output-dir", str(run_dir)]) == 0
    run = load_run(run_dir)
    assert run.kind == "causal-lm"
    rows = predict(run, ["the cat", "a dog"], max_new_tokens=4)
    assert all(isinstance(r["response"], str) for r in rows) and len(rows) == 2
    out = export_run(run_dir, tmp_path / "merged", merged=True)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = run.tokenizer(["the cat sat"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, run.model(**ids).logits, atol=1e-5)


@pytest.mark.parametrize("name", ["smollm2", "mpnet"])
def test_the_offline_backbones_predict_and_export_merged(tmp_path, glue_dir, name):
    if backbones.cached_backbone(name) is None:
        pytest.skip(f"{name} is not installed and cached (make {name})")
    run_dir = tmp_path / "run"
    args = tiny(glue_dir, run_dir, "--model", name, "--task", "sst2", "--report-to", "none")
    args[args.index("--task") + 1] = "sst2"
    assert main(args) == 0
    run = load_run(run_dir)
    inputs, labels, _ = prediction_inputs(run)
    assert score(run, predict(run, inputs), labels)["accuracy"] == pytest.approx(recorded(run_dir)["final"]["accuracy"])
    out = export_run(run_dir, tmp_path / "merged", merged=True)
    assert (out / "fwlora_export.json").is_file()
    texts = ["the film was good", "a dull and boring book"]
    expected = logits_of(run.model, run.tokenizer, texts)
    if run.head == "mean":
        from safetensors.torch import load_file
        from sentence_transformers import SentenceTransformer

        head = load_file(str(out / "classifier.safetensors"))
        got = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True) @ head["weight"].T + head["bias"]
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
        got = logits_of(plain, AutoTokenizer.from_pretrained(out), texts)
    assert torch.allclose(got, expected, atol=1e-4)
