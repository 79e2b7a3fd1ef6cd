"""Your own data through the CLI: a 4-class CSV with string labels and its own column names, a regression CSV,
prompt/response JSON Lines and chat messages train, bench and sweep; bad files get one line naming the file
and the row; the run records the data's fingerprint and class names."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from test_cli import error_line
from test_instruct import save_tiny_decoder, write_jsonl

from fwlora.cli import main
from fwlora.config import TrainConfig
from fwlora.errors import DataError, UserError
from fwlora.tasks import task_for
from fwlora.tasks.files import labelled_metrics, regression_metrics

TEAMS = {"billing": "invoice refund charge payment", "network": "router wifi latency outage",
         "hardware": "laptop screen battery keyboard", "account": "password login profile email"}


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def tickets(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Support tickets: the team (a string, 4 classes) is carried by one keyword per ticket."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        team = list(TEAMS)[i % 4]
        rows.append([i, f"ticket about my {rng.choice(TEAMS[team].split())} please help", team, "x"])
    return write_csv(path, ["id", "body", "team", "extra"], rows)


def similarity(path: Path, n: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "cat dog car tree house river cloud stone".split()
    rows = []
    for _ in range(n):
        a = rng.sample(words, 3)
        b = a[: rng.randint(0, 3)] + rng.sample(words, 2)
        rows.append([" ".join(a), " ".join(b), round(len(set(a) & set(b)) / 3 * 5, 2)])
    return write_csv(path, ["first", "second", "score"], rows)


TRAIN = ["--epochs", "1", "--batch-size", "8", "--rank", "1", "--max-length", "24", "--threads", "1", "--lr", "1e-3",
         "--report-to", "none"]


def test_four_class_csv_with_string_labels_trains_and_records_its_classes(tmp_path, capsys):
    data = tickets(tmp_path / "tickets.csv")
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--text-columns", "body", "--label-column", "team",
                 "--output-dir", str(out), *TRAIN]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["task"] == "tickets" and record["metric"] == "accuracy"
    assert record["data"]["label_names"] == ["account", "billing", "hardware", "network"]  # sorted
    assert record["data"]["num_labels"] == 4 and len(record["data"]["fingerprint"]) == 64
    assert record["data"]["train_examples"] + record["data"]["eval_examples"] == 64  # 10 % held out by default
    assert {"accuracy", "mcc", "f1_macro"} <= set(record["final"])


def test_regression_csv_is_mse_with_pearson_and_spearman(tmp_path):
    data = similarity(tmp_path / "sts.csv")
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--text-columns", "first,second", "--label-column", "score",
                 "--validation", "0.25", "--output-dir", str(out), *TRAIN]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["metric"] == "pearson" and record["data"]["num_labels"] == 1 and record["data"]["label_names"] is None
    assert record["data"]["eval_examples"] == 12 and {"pearson", "spearman", "mse"} <= set(record["final"])


def test_regression_metrics_match_scipy_and_a_hand_mse():
    y, p = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 1.5, 3.5, 3.0])
    m = regression_metrics(y, p)
    assert m["mse"] == pytest.approx((0.25 + 0.25 + 0.25 + 1.0) / 4)
    assert m["pearson"] == pytest.approx(np.corrcoef(y, p)[0, 1])
    # by hand: the predictions' ranks are (1.5, 1.5, 4, 3) (a tie averaged); their Pearson with (1, 2, 3, 4)
    assert m["spearman"] == pytest.approx(3.5 / (5 * 4.5) ** 0.5)
    assert regression_metrics(y, np.ones(4))["pearson"] == 0.0  # a constant prediction has no correlation
    assert labelled_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]), 3)["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_a_validation_file_and_unseen_labels(tmp_path):
    train = tickets(tmp_path / "train.csv")
    val = write_csv(tmp_path / "val.csv", ["id", "body", "team", "extra"], [[1, "my router", "network", ""],
                                                                            [2, "my invoice", "billing", ""]])
    settings = TrainConfig(dataset=str(train), text_columns=["body"], label_column="team", validation=str(val))
    task = task_for(settings)
    tr, ev, source = task.load()
    assert len(tr) == 64 and [e.label for e in ev] == [3, 1] and "evaluation: " in source
    bad = write_csv(tmp_path / "bad_val.csv", ["id", "body", "team", "extra"], [[1, "x", "network", ""],
                                                                                [2, "y", "sales", ""]])
    with pytest.raises(DataError, match=r"bad_val\.csv:3: label 'sales' does not occur in the training data"):
        task_for(TrainConfig(dataset=str(train), text_columns=["body"], label_column="team", validation=str(bad)))


@pytest.mark.parametrize("case, pattern", [
    ("missing_column", r"tickets\.csv: no column 'topic' \(--label-column\); its columns are id, body, team, extra"),
    ("empty_text", r"tickets\.csv:5: column 'body' is empty"),
    ("one_class", r"every training row has the label 'billing'"),
    ("empty_label", r"tickets\.jsonl:2: the label \('team'\) is empty"),
    ("bad_json", r"pairs\.jsonl:2: not valid JSON"),
    ("unknown_suffix", r"notes\.txt: unknown file type \.txt"),
    ("no_file", r"gone\.csv: no such file"),
])
def test_bad_files_are_one_line_naming_file_and_row(tmp_path, capsys, case, pattern):
    args = ["--text-columns", "body", "--label-column", "team"]
    if case == "missing_column":
        path = tickets(tmp_path / "tickets.csv")
        args = ["--text-columns", "body", "--label-column", "topic"]
    elif case == "empty_text":
        path = tickets(tmp_path / "tickets.csv")
        rows = list(csv.reader(open(path)))
        rows[4][1] = ""
        write_csv(path, rows[0], rows[1:])
    elif case == "one_class":
        path = write_csv(tmp_path / "tickets.csv", ["body", "team"], [["a", "billing"], ["b", "billing"], ["c", "billing"]])
    elif case == "empty_label":
        path = write_jsonl(tmp_path / "tickets.jsonl", [{"body": "a", "team": "x"}, {"body": "b", "team": None},
                                                        {"body": "c", "team": "y"}])
    elif case == "bad_json":
        path = tmp_path / "pairs.jsonl"
        path.write_text('{"body": "a", "team": "x"}\n{"body": "b", "team"\n', encoding="utf-8")
    elif case == "unknown_suffix":
        path = tmp_path / "notes.txt"
        path.write_text("hello\n")
    else:
        path = tmp_path / "gone.csv"
    assert main(["train", "--dataset", str(path), *args, "--output-dir", str(tmp_path / "run"), *TRAIN]) == 2
    assert __import__("re").search(pattern, error_line(capsys))


def test_own_data_flags_without_a_dataset_are_refused():
    with pytest.raises(UserError, match="--label-column describes your own data: give --dataset FILE too"):
        TrainConfig(label_column="team")
    with pytest.raises(UserError, match="go together"):
        TrainConfig(dataset="x.jsonl", prompt_column="p")


def test_prompt_response_jsonl_and_chat_messages_train_a_decoder(tmp_path):
    model = save_tiny_decoder(tmp_path / "llama", "llama")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"add {i} and 1", "answer": f"{i + 1}"} for i in range(24)])
    out = tmp_path / "pairs-run"
    assert main(["train", "--model", str(model), "--dataset", str(pairs), "--prompt-column", "prompt",
                 "--response-column", "answer", "--output-dir", str(out), *TRAIN]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["metric"] == "eval_loss" and record["higher_is_better"] is False and record["data"]["model_kind"] == "causal-lm"
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [
        {"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "hello again"}]} for i in range(24)])
    out = tmp_path / "chat-run"
    assert main(["train", "--model", str(model), "--dataset", str(chats), "--messages-column", "messages",
                 "--output-dir", str(out), *TRAIN]) == 0
    assert json.loads((out / "result.json").read_text())["final"]["perplexity"] > 1


def test_chat_labels_cover_the_assistant_turns_only():
    from fwlora.tasks.chat import ChatExample, encode_conversation
    from test_instruct import tiny_tokenizer

    tok = tiny_tokenizer(True)
    example = ChatExample((("user", "what is two plus three"), ("assistant", "5"), ("user", "add 1 2"),
                           ("assistant", "answer 3")))
    item, cut = encode_conversation(example, tok, 256)
    trained = tok.decode([t for t, y in zip(item["input_ids"], item["labels"]) if y != -100])
    assert trained.split() == ["5", "<|im_end|>", "answer", "3", "<|im_end|>"] and not cut  # the two assistant turns
    full = tok.apply_chat_template([{"role": r, "content": c} for r, c in example.messages], tokenize=False)
    assert tok.decode(item["input_ids"]) == tok.decode(tok(full, add_special_tokens=False)["input_ids"])


def test_bench_and_sweep_take_your_own_data(tmp_path, capsys):
    data = tickets(tmp_path / "tickets.csv")
    own = ["--set", f"dataset={data}", "--set", "text_columns=[body]", "--set", "label_column=team",
           "--set", "epochs=1", "--set", "max_length=24", "--set", "threads=1", "--set", "report_to=none"]
    out = tmp_path / "bench"
    assert main(["bench", "--methods", "lora,fwlora", "--ranks", "1", "--seeds", "1", "--output-dir", str(out),
                 *own, "--set", "fw_warmup_steps=2", "--set", "batch_size=8"]) == 0
    assert (out / "tickets" / "r1" / "fwlora" / "seed0" / "result.json").is_file()
    assert "tickets (accuracy)" in (out / "report" / "report.md").read_text()
    sweep = tmp_path / "sweep"
    assert main(["sweep", "--method", "lora", "--trials", "2", "--dataset", str(data), "--text-columns", "body",
                 "--label-column", "team", "--epochs", "1", "--max-length", "24", "--threads", "1", "--rank", "1",
                 "--batch-size", "8", "--report-to", "none", "--output-dir", str(sweep)]) == 0
    assert "best of N per method" in (sweep / "sweep_summary.md").read_text()
