"""Pinned reference values: a few-step run of every built-in method on a tiny fixed model and fixed data.

Each method's per-epoch training loss and evaluation metrics are checked against numbers recorded when this
file was written (by `python tests/test_regression.py`, which prints them). A change that moves every method
alike (data order, initialisation, schedule, loss scaling, evaluation) fails here even where the
method-against-method tests still agree. Tolerance: losses to a relative 1e-4 (float32 sums on 1 thread;
room for another BLAS build); accuracy and MCC exactly (a change that flips one prediction is a change).
If a change is intended, re-record with the command above and say why in the commit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

METHOD_SETTINGS = {
    "lora": {},
    "adalora": {},
    "fwlora": {"fw_warmup_steps": 3, "lambda_fw": 1.0, "fw_measure_every": 1, "fw_estimator": "exact"},
    "fwrank": {"fwrank_warmup_steps": 3, "fwrank_warmup_rank": 3, "fwrank_r_max": 4, "fwrank_measure_every": 1},
}
COMMON = dict(task="sst2", rank=2, train_limit=160, eval_limit=64, max_length=24, epochs=3, batch_size=16, lr=3e-2,
              head="model", threads=1, eval_batch_size=64, seed=0)

# recorded values: {method: [(loss, accuracy, mcc) per epoch]}
# (the tiny random model stays at the majority class in 30 steps: the losses carry the signal; the metrics
# pin the evaluation path, e.g. a label mapping that flipped would read accuracy 0.40625)
PINNED: dict[str, list[tuple[float, float, float]]] = {
    'lora': [(0.6926446914672851, 0.59375, 0.0), (0.6717402458190918, 0.59375, 0.0), (0.6745751857757568, 0.59375, 0.0)],
    'adalora': [(0.6967911720275879, 0.59375, 0.0), (0.6736762046813964, 0.59375, 0.0), (0.6726700782775878, 0.59375, 0.0)],
    'fwlora': [(0.6925953388214111, 0.59375, 0.0), (0.6723855495452881, 0.59375, 0.0), (0.6748940944671631, 0.59375, 0.0)],
    'fwrank': [(0.6936907768249512, 0.59375, 0.0), (0.6734282493591308, 0.59375, 0.0), (0.6780653476715088, 0.59375, 0.0)],
}


def tiny_model_dir(root: Path) -> Path:
    """A 2-layer BERT with hidden size 16, seeded, saved with the bundled MiniLM tokenizer: no download."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fwlora.models import resolve_backbone

    path = root / "tiny-bert"
    if (path / "config.json").is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    torch.manual_seed(1234)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_method(method: str, model_dir: Path, data_dir: Path, out: Path) -> list[tuple[float, float, float]]:
    from fwlora.config import TrainConfig
    from fwlora.rundir import quiet_transformers
    from fwlora.train import train

    cfg = TrainConfig.from_dict({**COMMON, **METHOD_SETTINGS[method], "method": method, "model": str(model_dir),
                                 "data_dir": str(data_dir), "output_dir": str(out / method)})
    with quiet_transformers():
        record = train(cfg)
    return [(e["loss"], e["accuracy"], e["mcc"]) for e in record.epochs]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_a_few_steps_reproduce_the_pinned_numbers(method, tiny_model, glue_dir, tmp_path):
    got = run_method(method, tiny_model, glue_dir, tmp_path)
    want = PINNED[method]
    assert len(got) == len(want)
    for (loss, acc, mcc), (loss0, acc0, mcc0) in zip(got, want):
        assert loss == pytest.approx(loss0, rel=1e-4)
        assert (acc, mcc) == (acc0, pytest.approx(mcc0, abs=1e-12))


if __name__ == "__main__":  # re-record: prints the PINNED table
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_synthetic_glue

    tmp = Path(tempfile.mkdtemp())
    model_dir, data_dir = tiny_model_dir(tmp), write_synthetic_glue(tmp / "glue")
    table = {m: run_method(m, model_dir, data_dir, tmp / "runs") for m in METHOD_SETTINGS}
    print("PINNED = {")
    for m, rows in table.items():
        print(f"    {m!r}: {[tuple(r) for r in rows]!r},")
    print("}")
