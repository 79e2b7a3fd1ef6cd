"""Scoring instruction tasks: GSM8K's final-number extraction and exact match, and `evaluate` (the
token-weighted response loss and perplexity, exact match by greedy generation) against a hand-rolled
greedy decode and float64 log-probabilities, on a tiny random decoder."""

from __future__ import annotations

import math

import pytest
import torch
from test_instruct import save_tiny_decoder

from fwlora import models
from fwlora.tasks import get_task
from fwlora.tasks.gsm8k import exact_match, gsm8k_final_number
from fwlora.tasks.instruct import IGNORE_INDEX, InstructExample, encode_instruction


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
