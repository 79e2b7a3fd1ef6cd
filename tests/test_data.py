"""The GLUE TSV reader: good files parse exactly, every malformed one is one DataError naming the file
and line (the CLI turns it into exit code 2 and one line on stderr, no traceback), and no random
content makes it raise anything else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fwlora.cli import main
from fwlora.tasks import resolve_data_dir, subset
from fwlora.tasks.glue import TASKS, Example, load_task, read_tsv
from fwlora.errors import DataError, UserError

COLA, RTE = TASKS["cola"], TASKS["rte"]


def write_task(root: Path, task: str = "cola", train: str | bytes | None = None,
               validation: str | bytes | None = None, n: int = 24) -> Path:
    """<root>/<task>/{train,validation}.tsv; a split left None gets n valid rows."""
    spec = TASKS[task]
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "quickly", "blue"]
    for split, content in (("train", train), ("validation", validation)):
        if content is None:
            lines = ["\t".join(spec.header)]
            for i in range(n):
                texts = [" ".join(words[(i * 7 + j * 3 + k) % len(words)] for k in range(3 + i % 5))
                         for j in range(len(spec.text_fields))]
                lines.append("\t".join(texts + [str((i * 5) % 3 % 2)]))
            content = "\n".join(lines) + "\n"
        data = content.encode("utf-8") if isinstance(content, str) else content
        (folder / f"{split}.tsv").write_bytes(data)
    return root


# ---- good files ------------------------------------------------------------------------------------


def test_single_sentence_file_parses_exactly(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text('sentence\tlabel\nHe said "hi.\t1\n  padded  \t0\nlast line, no newline\t1', encoding="utf-8")
    assert read_tsv(path, COLA) == [Example(('He said "hi.',), 1), Example(("  padded  ",), 0),
                                    Example(("last line, no newline",), 1)]


def test_pair_file_crlf_and_bom_parse(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"\xef\xbb\xbfsentence1\tsentence2\tlabel\r\nA man.\tA person.\t0\r\nx\ty\t1\r\n")
    assert read_tsv(path, RTE) == [Example(("A man.", "A person."), 0), Example(("x", "y"), 1)]


def test_unicode_line_separators_inside_a_sentence_are_not_line_ends(tmp_path):
    # str.splitlines() would cut at these; the format's only line end is LF
    odd = "a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g\rh"
    path = tmp_path / "train.tsv"
    path.write_text(f"sentence\tlabel\n{odd}\t1\nnext\t0\n", encoding="utf-8")
    assert read_tsv(path, COLA) == [Example((odd,), 1), Example(("next",), 0)]


def test_label_with_surrounding_spaces_is_read(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\nok\t 1 \n", encoding="utf-8")
    assert read_tsv(path, COLA) == [Example(("ok",), 1)]


@pytest.mark.realdata
def test_real_glue_copy_has_the_documented_row_counts(real_glue_dir):
    glue_dir = real_glue_dir
    counts = {"sst2": (67349, 872), "cola": (8551, 1043), "rte": (2490, 277), "mrpc": (3668, 408)}
    ones = {"sst2": (37569, 444), "cola": (6023, 721), "rte": (1241, 131), "mrpc": (2474, 279)}
    for task, (n_train, n_val) in counts.items():
        train, val, source = load_task(task, glue_dir)
        assert (len(train), len(val)) == (n_train, n_val), task
        assert (sum(e.label for e in train), sum(e.label for e in val)) == ones[task], task
        assert source == str(glue_dir / task)
        assert all(len(e.texts) == len(TASKS[task].text_fields) for e in train)


def test_subset_is_seeded_in_file_order_and_checked():
    examples = [Example((str(i),), i % 2) for i in range(50)]
    a, b = subset(examples, 10), subset(examples, 10)
    assert a == b and len(a) == 10
    assert [int(e.texts[0]) for e in a] == sorted(int(e.texts[0]) for e in a)
    assert subset(examples, None) is examples and subset(examples, 500) is examples
    with pytest.raises(UserError, match="train-limit"):
        subset(examples, 0)


# ---- malformed files: one message with file and line -------------------------------------------------

BAD = {
    # name: (file content, expected line or None for a file-level error, pattern of the message)
    "wrong_header": ("text\tlabel\nok\t1\n", 1, r"header is 'text<TAB>label', expected 'sentence<TAB>label'"),
    "pair_header_for_single_task": ("sentence1\tsentence2\tlabel\na\tb\t1\n", 1, r"header is"),
    "label_not_integer": ("sentence\tlabel\nok\t1\nbad\tyes\n", 3, r"label 'yes' is not an integer"),
    "label_float": ("sentence\tlabel\nbad\t1.0\n", 2, r"label '1.0' is not an integer"),
    "label_underscore": ("sentence\tlabel\nbad\t1_0\n", 2, r"not an integer"),
    "label_not_a_class": ("sentence\tlabel\nok\t0\nbad\t2\n", 3, r"label 2 is not a class of cola \(0\.\.1\)"),
    "label_negative": ("sentence\tlabel\nbad\t-1\n", 2, r"label -1 is not a class"),
    "label_huge": ("sentence\tlabel\nbad\t" + "9" * 5000 + "\n", 2, r"is not a class"),
    "label_empty": ("sentence\tlabel\nbad\t\n", 2, r"label '' is not an integer"),
    "no_tab": ("sentence\tlabel\nok\t1\nno tab here 1\n", 3, r"no tab, expected 2 tab-separated fields"),
    "extra_tab": ("sentence\tlabel\na\tb\t1\n", 2, r"3 fields, expected 2"),
    "empty_line": ("sentence\tlabel\nok\t1\n\nok\t0\n", 3, r"empty line"),
    "empty_file": ("", None, r"the file is empty \(expected a header sentence<TAB>label\)"),
    "header_only": ("sentence\tlabel\n", None, r"has a header but no examples"),
    "bad_utf8": (b"sentence\tlabel\nok\t1\nbad \xff\xfe byte\t0\n", 3, r"not valid UTF-8"),
    "latin1_header": ("sentence\tlabel\n".encode() + "caf\xe9\t1\n".encode("latin-1"), 2, r"not valid UTF-8"),
}


def _check_message(message: str, path: Path, line: int | None, pattern: str) -> None:
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(prefix), message
    assert re.search(pattern, message), message
    assert "\n" not in message


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_file_is_one_data_error_with_file_and_line(tmp_path, case):
    content, line, pattern = BAD[case]
    path = tmp_path / "train.tsv"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    with pytest.raises(DataError) as info:
        read_tsv(path, COLA)
    _check_message(str(info.value), path, line, pattern)


def test_pair_task_with_a_missing_sentence_names_the_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nonly one\t0\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_tsv(path, RTE)
    _check_message(str(info.value), path, 3, r"2 fields, expected 3")


def test_missing_data_directory_task_folder_and_file(tmp_path):
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist"):
        load_task("cola", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"cola: no such directory .* has no cola/ folder"):
        load_task("cola", tmp_path)
    (tmp_path / "cola").mkdir()
    write_task(tmp_path, "cola")
    (tmp_path / "cola" / "validation.tsv").unlink()
    with pytest.raises(DataError, match=r"validation\.tsv: no such file \(expected <data-dir>/cola/validation\.tsv\)"):
        load_task("cola", tmp_path)
    (tmp_path / "cola" / "validation.tsv").mkdir()  # a directory where the file should be
    with pytest.raises(DataError, match="no such file"):
        load_task("cola", tmp_path)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_task(tmp_path, "cola")
    monkeypatch.setenv("FWLORA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    train, val, source = load_task("cola")
    assert len(train) == len(val) == 24 and source == str(tmp_path / "cola")
    monkeypatch.setenv("FWLORA_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="gone does not exist"):
        load_task("cola")


def test_unknown_and_regression_tasks_are_user_errors():
    with pytest.raises(UserError, match=r"unknown task 'colaa'; known tasks: cola, sst2"):
        load_task("colaa")
    with pytest.raises(UserError, match="regression"):
        load_task("stsb")


# ---- the same through the CLI: exit code 2, one line on stderr, nothing written ---------------------


def _train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "cola", "--data-dir", str(data_dir), "--output-dir", str(out), "--rank", "1",
            "--train-limit", "16", "--eval-limit", "16", "--max-length", "16", "--epochs", "1", *extra]


@pytest.mark.parametrize("case", ["wrong_header", "label_not_integer", "label_not_a_class", "empty_file", "no_tab",
                                  "bad_utf8", "empty_line"])
def test_cli_bad_data_exits_2_with_file_and_line(tmp_path, capsys, case):
    content, line, pattern = BAD[case]
    write_task(tmp_path / "glue", "cola", validation=content)
    out = tmp_path / "run"
    assert main(_train_args(tmp_path / "glue", out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fwlora: error: ")
    _check_message(err[0].removeprefix("fwlora: error: "), tmp_path / "glue" / "cola" / "validation.tsv", line, pattern)
    assert not out.exists()  # a bad input is refused before the run directory is made


def test_cli_missing_data_directory_exits_2(tmp_path, capsys):
    assert main(_train_args(tmp_path / "missing", tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing does not exist" in err and "Traceback" not in err


# ---- property-based: random content -> examples consistent with it, or a DataError with file and line --

def _scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp()


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(st.binary(max_size=300),
                     st.lists(st.sampled_from([b"sentence", b"label", b"\t", b"\n", b"\r", b"0", b"1", b"2", b"x",
                                               b" ", b"\xff", b"\xc3\xa9", b"\xef\xbb\xbf", b"-", b"\x00"]),
                              max_size=60).map(b"".join)))
def test_random_bytes_parse_or_fail_with_file_and_line(tmp_path_factory, raw):
    path = _scratch(tmp_path_factory) / "random.tsv"
    path.write_bytes(raw)
    try:
        examples = read_tsv(path, COLA)
    except DataError as e:
        message = str(e)
        assert message.startswith(f"{path}:"), message
        m = re.match(re.escape(str(path)) + r":(\d+): ", message)
        if m:
            assert 1 <= int(m.group(1)) <= raw.count(b"\n") + 1
        return
    text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    lines = text.split("\n")
    assert lines[0].removesuffix("\r") == "sentence\tlabel"
    assert 1 <= len(examples) <= len(lines) - 1
    assert all(len(e.texts) == 1 and e.label in (0, 1) for e in examples)


_TEXT = st.text(alphabet=st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), max_size=12) | \
    st.sampled_from(["", " ", "x\x0by", "a\u2028b", "\x85", '"quoted', "é"])
_LABEL = st.sampled_from(["0", "1", " 1", "1 ", "+1", "01", "2", "-1", "-0", "1.0", "one", "", "1_0", "\u0661",
                          "99999999999999999999"]) | _TEXT


@st.composite
def tsv_file(draw):
    header = draw(st.sampled_from([["sentence", "label"], ["sentence", "label"], ["sentence", "label"],
                                   ["sentence1", "sentence2", "label"], ["label", "sentence"], ["sentence"], [""]]))
    rows = draw(st.lists(st.one_of(
        st.tuples(_TEXT, _LABEL).map(list),
        st.tuples(_TEXT, st.sampled_from(["0", "1"])).map(list),
        st.lists(_TEXT, min_size=1, max_size=4)), max_size=8))
    return header, rows, draw(st.booleans()), draw(st.booleans()), draw(st.booleans())


def expected_outcome(header, rows, crlf, final_newline, bom):
    """What the format says: ('error', line or None) or ('ok', examples)."""
    if not final_newline and rows and rows[-1] == [""]:
        rows, final_newline = rows[:-1], True  # "...\n" + "" is the same file as one ending in a line end
    if header == [""] and not rows and not final_newline:
        return "error", None  # the empty file
    if header != ["sentence", "label"]:
        return "error", 1
    examples = []
    for lineno, row in enumerate(rows, start=2):
        if len(row) != 2:
            return "error", lineno
        label = row[1].strip()
        if not re.fullmatch(r"[+-]?[0-9]+", label) or not 0 <= int(label) < 2:
            return "error", lineno
        examples.append(Example((row[0],), int(label)))
    if not examples:
        return "error", None
    return "ok", examples


@settings(max_examples=200, deadline=None)
@given(tsv_file())
@example(([""], [[""]], False, False, False))  # "\n": one empty header line, not an empty file
def test_random_tsv_gives_the_examples_or_the_first_bad_line(tmp_path_factory, case):
    header, rows, crlf, final_newline, bom = case
    end = "\r\n" if crlf else "\n"
    text = end.join("\t".join(r) for r in [header] + rows) + (end if final_newline else "")
    path = _scratch(tmp_path_factory) / "structured.tsv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    kind, value = expected_outcome(header, rows, crlf, final_newline, bom)
    if kind == "ok":
        assert read_tsv(path, COLA) == value
        return
    with pytest.raises(DataError) as info:
        read_tsv(path, COLA)
    prefix = f"{path}:{value}: " if value is not None else f"{path}: "
    assert str(info.value).startswith(prefix), (str(info.value), value)


# ---- the Task interface ------------------------------------------------------------------------------


def test_get_task_gives_each_kind_its_model_and_metric():
    from fwlora.tasks import Task, get_task

    cola, mrpc, mnli = get_task("cola"), get_task("mrpc"), get_task("mnli")
    assert (cola.name, cola.metric, cola.higher_is_better, cola.model_kind, cola.num_labels) == \
        ("cola", "mcc", True, "sequence-classification", 2)
    assert (mrpc.metric, mrpc.is_pair, mnli.num_labels) == ("accuracy", True, 3)
    gsm, alpaca, dolly = get_task("gsm8k"), get_task("alpaca"), get_task("dolly")
    assert (gsm.metric, gsm.higher_is_better, gsm.model_kind, gsm.num_labels, gsm.max_new_tokens) == \
        ("exact_match", True, "causal-lm", None, 256)
    assert get_task("gsm8k", max_new_tokens=32).max_new_tokens == 32
    assert (alpaca.metric, alpaca.higher_is_better, dolly.metric) == ("eval_loss", False, "eval_loss")
    assert all(isinstance(t, Task) for t in (cola, gsm, alpaca))
    with pytest.raises(UserError, match=r"unknown task 'colaa'; known tasks: cola, .* \(GLUE classification\), gsm8k, alpaca, dolly"):
        get_task("colaa")
    with pytest.raises(UserError, match="regression"):
        get_task("stsb")


def test_classification_metrics_by_hand():
    import math

    import numpy as np

    from fwlora.tasks.glue import classification_metrics

    labels, preds = np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 1])
    tp, tn, fp, fn = 2, 2, 0, 1
    m = classification_metrics(labels, preds, pair=True)
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert "f1" not in classification_metrics(labels, preds, pair=False)


def test_majority_baseline_is_what_a_constant_predictor_scores():
    from fwlora.tasks import get_task

    val = [Example(("a",), 1), Example(("b",), 1), Example(("c",), 0), Example(("d",), 1)]
    assert get_task("cola").majority_baseline(val) == {"accuracy": 0.75, "mcc": 0.0}
    pair = [Example(("a", "b"), y) for y in (1, 1, 0, 1)]
    # always 1: precision 3/4, recall 1 -> F1 = 2 * 3/4 / (3/4 + 1)
    assert get_task("mrpc").majority_baseline(pair) == pytest.approx({"accuracy": 0.75, "mcc": 0.0, "f1": 6 / 7})
    zeros = [Example(("a", "b"), y) for y in (0, 0, 1)]
    assert get_task("rte").majority_baseline(zeros) == pytest.approx({"accuracy": 2 / 3, "mcc": 0.0, "f1": 0.0})
    tie = [Example(("a", "b"), y) for y in (2, 0, 2, 0, 1)]
    assert get_task("mnli").majority_baseline(tie)["accuracy"] == pytest.approx(0.4)  # the lowest of the tied classes


def test_classification_evaluate_gathers_the_argmax_over_the_whole_set():
    import torch
    from accelerate import Accelerator
    from conftest import tiny_bert

    from fwlora.tasks import get_task
    from fwlora.tasks.glue import classification_metrics
    from test_instruct import tiny_tokenizer

    task = get_task("mrpc")
    tok = tiny_tokenizer()
    tok.pad_token = "<unk>"  # id 0 < tiny_bert's vocabulary of 50
    gen = torch.Generator().manual_seed(0)
    items = [{"input_ids": torch.randint(1, 50, (int(n),), generator=gen).tolist(), "labels": int(y)}
             for n, y in zip(torch.randint(3, 9, (7,), generator=gen), torch.randint(0, 2, (7,), generator=gen))]
    for item in items:
        item["attention_mask"] = [1] * len(item["input_ids"])
    model = tiny_bert(seed=3)
    loader = torch.utils.data.DataLoader(items, batch_size=3, collate_fn=task.eval_collator(tok))
    model.train()
    metrics = task.evaluate(model, loader, Accelerator(cpu=True), tok, max_new_tokens=5)
    assert model.training
    model.eval()
    with torch.no_grad():  # by hand: one example at a time, unpadded
        preds = [int(model(input_ids=torch.tensor([i["input_ids"]])).logits.argmax()) for i in items]
    labels = [i["labels"] for i in items]
    assert metrics == classification_metrics(torch.tensor(labels).numpy(), torch.tensor(preds).numpy(), pair=True)
    assert metrics["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / 7)


def test_pairs_keep_the_tokenizer_s_template_or_are_joined_by_a_line_break():
    from transformers import AutoTokenizer

    from fwlora.tasks.glue import encode
    from fwlora.models import resolve_backbone
    from test_instruct import tiny_tokenizer

    pair = [Example(("what is two", "plus three"), 1)]
    bert = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    assert encode(pair, bert, 32)[0]["input_ids"] == bert("what is two", "plus three")["input_ids"]  # [SEP] between
    decoder = tiny_tokenizer()  # no pair template, like SmolLM2's
    item = encode(pair, decoder, 32)[0]
    assert item["input_ids"] == decoder("what is two\nplus three")["input_ids"] and item["labels"] == 1
