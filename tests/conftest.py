"""Shared fixtures: tiny random models (fast, float64-capable), GLUE-format data, offline hub.

Data: `glue_dir` is a small synthetic GLUE-format copy written here (learnable, deterministic), so the
suite runs in any clone. Tests of the real files take `real_glue_dir` and carry the `realdata` marker;
where ../shared/glue is absent they are deselected (not skipped), and CI, which has it, runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait ~25 s on a hub that cannot be reached
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a test's subprocess (torchrun ranks, CLI runs) that aborts prints every thread's Python stack: where it was
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# bitsandbytes (installed by the dev extra) warns at import that it cannot fetch a CPU kernel from the hub
import logging  # noqa: E402

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = Path(os.environ.get("FWLORA_TEST_GLUE", REPO.parent / "shared" / "glue"))
TARGETS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run with --threads changes torch's global thread count: give it back after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def has_real_glue() -> bool:
    return (SHARED_GLUE / "cola" / "train.tsv").is_file()


def pytest_collection_modifyitems(config, items):
    """Without the real GLUE copy, the real-data tests are deselected with one line saying so."""
    if has_real_glue():
        return
    real = [item for item in items if item.get_closest_marker("realdata")]
    if real:
        config.hook.pytest_deselected(items=real)
        items[:] = [item for item in items if not item.get_closest_marker("realdata")]
        print(f"\nconftest: {len(real)} real-data test(s) deselected: no GLUE copy at {SHARED_GLUE} "
              "(set FWLORA_TEST_GLUE to one to run them)")


@pytest.fixture
def real_glue_dir() -> Path:
    """The real shared GLUE copy (tests using it are marked realdata)."""
    if not has_real_glue():  # only reached when a realdata test is selected by hand
        pytest.skip(f"needs the shared GLUE copy at {SHARED_GLUE}")
    return SHARED_GLUE


# A vocabulary MiniLM's tokenizer knows; the label is carried by one sentiment word per sentence, so every
# method learns the synthetic tasks in a few dozen steps.
_NEUTRAL = ("the film story actor scene music plot camera year city people house road night water time day "
            "friend book table garden window letter street game team car").split()
_POSITIVE = "good great wonderful excellent lovely brilliant delightful superb".split()
_NEGATIVE = "bad awful terrible boring dreadful poor dull horrible".split()
SYNTHETIC_SIZES = {"cola": (400, 160), "sst2": (400, 160), "mrpc": (240, 96), "rte": (240, 96)}


def write_synthetic_glue(root: Path, sizes: dict[str, tuple[int, int]] = SYNTHETIC_SIZES, seed: int = 0) -> Path:
    """<root>/<task>/{train,validation}.tsv in the shared copy's exact format, with a learnable label."""
    import random

    rng = random.Random(seed)

    def sentence(label: int) -> str:
        words = [rng.choice(_NEUTRAL) for _ in range(rng.randint(4, 10))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(_POSITIVE if label else _NEGATIVE))
        return " ".join(words)

    for task, (n_train, n_val) in sizes.items():
        pair = task in ("mrpc", "rte")
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("validation", n_val)):
            header = "sentence1\tsentence2\tlabel" if pair else "sentence\tlabel"
            rows = [header]
            for _ in range(n):
                label = int(rng.random() < 0.6)  # a majority class, as in CoLA and MRPC
                texts = [" ".join(rng.choice(_NEUTRAL) for _ in range(6)), sentence(label)] if pair else [sentence(label)]
                rows.append("\t".join(texts + [str(label)]))
            (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """A synthetic GLUE-format directory (cola, sst2, mrpc, rte): the suite never needs files outside the repo."""
    return write_synthetic_glue(tmp_path_factory.mktemp("glue"))


def tiny_bert(num_labels: int = 2, dtype: torch.dtype = torch.float64, arch: str = "bert", seed: int = 0,
              dropout: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    kw = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
              max_position_embeddings=40, num_labels=num_labels, hidden_dropout_prob=dropout,
              attention_probs_dropout_prob=dropout)
    if arch == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **kw))
    else:
        model = BertForSequenceClassification(BertConfig(**kw))
    return model.to(dtype)


def lora(model, r: int = 2, alpha: float = 4.0, targets=None, dropout: float = 0.0, rslora: bool = False,
         init_b: bool = True, seed: int = 0):
    """A PEFT LoRA model; B gets random values (init_b) so that dW and the penalty are not zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or TARGETS, lora_dropout=dropout,
                        use_rslora=rslora, modules_to_save=["classifier"])
    peft_model = get_peft_model(model, config)
    if init_b:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return peft_model


def batch(n: int = 8, length: int = 7, vocab: int = 50, seed: int = 0, num_labels: int = 2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    for i, L in enumerate(lengths):
        mask[i, L:] = 0
        ids[i, L:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, num_labels, (n,), generator=gen)}
