"""Decoders through every method, end to end with `fwlora train`: a tiny random Qwen3 and LLaMA (built from
configs, no download) as sequence classifiers on a GLUE-format task and as instruction tuners on GSM8K-format
data; FW-LoRA's Fisher under bf16 autocast stays finite on a decoder as on encoders."""

from __future__ import annotations

import json
import math

import pytest
from test_instruct import _gsm_rows, save_tiny_decoder, write_jsonl

from fwlora.cli import main

METHODS = {"lora": [], "adalora": ["--lr", "3e-3"], "fwlora": ["--fw-warmup-steps", "3", "--fw-measure-every", "1"],
           "fwrank": ["--fwrank-warmup-steps", "3", "--fwrank-measure-every", "1", "--fwrank-r-max", "4"]}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {arch: save_tiny_decoder(root / arch, arch) for arch in ("qwen3", "llama")}


@pytest.fixture(scope="module")
def gsm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm")
    write_jsonl(root / "gsm8k" / "train.jsonl", _gsm_rows(48))
    write_jsonl(root / "gsm8k" / "test.jsonl", _gsm_rows(6, 100))
    return root


COMMON = ["--rank", "2", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--threads", "1", "--eval-batch-size", "16"]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_every_method_trains_a_decoder_classifier(decoders, glue_dir, tmp_path, arch, method):
    out = tmp_path / "run"
    assert main(["train", "--model", str(decoders[arch]), "--task", "sst2", "--method", method, "--data-dir",
                 str(glue_dir), "--train-limit", "48", "--eval-limit", "32", "--max-length", "24",
                 "--output-dir", str(out), *COMMON, *METHODS[method]]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "complete" and result["timing"]["optimizer_steps"] == 12
    assert result["budget"]["head"] == "model"  # the decoder's own last-token head
    kinds = {m["kind"] for m in result["matrices"]}
    assert kinds <= {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"} and len(result["matrices"]) == 14  # 7 projections x 2 layers
    assert 0.0 <= result["final"]["accuracy"] <= 1.0


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_every_method_instruction_tunes_a_decoder(decoders, gsm_dir, tmp_path, arch, method):
    out = tmp_path / "run"
    assert main(["train", "--model", str(decoders[arch]), "--task", "gsm8k", "--method", method, "--data-dir",
                 str(gsm_dir), "--max-length", "64", "--max-new-tokens", "4", "--output-dir", str(out), *COMMON,
                 *METHODS[method]]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "complete" and result["metric"] == "exact_match"
    assert result["timing"]["optimizer_steps"] == 12  # 48 examples / 8 x 2 epochs
    final = result["final"]
    assert math.isfinite(final["eval_loss"]) and final["perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    assert 0.0 <= final["exact_match"] <= 1.0


def test_fisher_under_bf16_autocast_is_finite_on_a_decoder(decoders, glue_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", str(decoders["qwen3"]), "--task", "sst2", "--method", "fwlora", "--data-dir",
                 str(glue_dir), "--train-limit", "48", "--eval-limit", "32", "--max-length", "24",
                 "--mixed-precision", "bf16", "--output-dir", str(out), *COMMON, *METHODS["fwlora"]]) == 0
    result = json.loads((out / "result.json").read_text())
    fisher = [m["fisher"] for m in result["matrices"]]
    assert all(math.isfinite(f) and f >= 0 for f in fisher) and any(f > 0 for f in fisher)
    assert sum(m["importance"] for m in result["matrices"]) == pytest.approx(1.0)
