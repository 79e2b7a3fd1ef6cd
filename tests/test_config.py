"""TrainConfig and config files: every bad setting is one UserError that names it; random mappings and
random file contents give a TrainConfig or a UserError, never another exception."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fwlora.cli import build_parser, collect_train_settings, main
from fwlora.config import TrainConfig, config_fields, load_config_file
from fwlora.errors import UserError

FIELDS = {f.name for f in config_fields()}


def test_defaults_are_valid_and_round_trip():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert set(cfg.identity()) == FIELDS - set(TrainConfig.NON_IDENTITY)
    assert cfg.replace(lr=1e-3).lr == 1e-3


@pytest.mark.parametrize("values, pattern", [
    ({"method": "nosuch"}, r"method = 'nosuch': unknown method; use one of lora, adalora, fwlora"),
    ({"lambda_fw": -1e-4}, r"lambda-fw = -0\.0001: must be a finite number >= 0"),
    ({"lambda_fw": math.inf}, r"lambda-fw"),
    ({"fw_beta": 0.0}, r"fw-beta = 0\.0: must lie strictly between 0 and 1"),
    ({"fw_beta": 1.0}, r"fw-beta = 1\.0: must lie strictly between 0 and 1"),
    ({"fw_beta": 1.5}, r"fw-beta"),
    ({"fw_beta": -0.5}, r"fw-beta"),
    ({"fw_beta": math.nan}, r"fw-beta"),
    ({"adalora_beta1": 1.0}, r"adalora-beta1"),
    ({"lr": 0.0}, r"lr = 0\.0: must be a positive number"),
    ({"lr": math.nan}, r"lr = nan"),
    ({"budget": -0.2}, r"budget = -0\.2: must be a positive percentage"),
    ({"budget": 0.2, "rank": 2}, r"give --budget or --rank, not both"),
    ({"rank": 0}, r"rank = 0: must be >= 1"),
    ({"epochs": 0}, r"epochs = 0: must be >= 1"),
    ({"fw_warmup_steps": 0}, r"fw-warmup-steps = 0: must be >= 1"),
    ({"fw_measure_every": 5, "fw_warmup_steps": 4}, r"fw-measure-every"),
    ({"batch_size": 30, "grad_accum": 4}, r"batch-size = 30: must be divisible by grad-accum = 4"),
    ({"warmup_ratio": 1.0}, r"warmup-ratio"),
    ({"lora_dropout": 1.0}, r"lora-dropout"),
    ({"head": "cls"}, r"head = 'cls'"),
    ({"mixed_precision": "fp8"}, r"mixed-precision"),
    ({"fw_estimator": "approx"}, r"fw-estimator"),
    ({"adalora_tfinal": 1.2}, r"adalora-tfinal"),
])
def test_bad_setting_is_one_user_error_naming_it(values, pattern):
    with pytest.raises(UserError, match=pattern) as info:
        TrainConfig.from_dict(values)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("values, pattern", [
    ({"learning_rate": 1e-3}, r"unknown setting\(s\) learning_rate; known: adalora_alpha"),
    ({"epochs": 2.5}, r"epochs must be an integer, got 2\.5"),
    ({"epochs": True}, r"epochs must be an integer, got True"),
    ({"epochs": "3"}, r"epochs must be an integer, got '3'"),
    ({"lr": "fast"}, r"lr must be a number, got 'fast'"),
    ({"lr": 10**400}, r"lr is too large a number"),
    ({"task": 3}, r"task must be a string, got 3"),
    ({"task": None}, r"task may not be null"),
    ({"allow_late_penalty": "yes"}, r"allow_late_penalty must be true or false"),
    ({"target_modules": [1, 2]}, r"target_modules must be a list of strings"),
])
def test_wrong_key_or_type_names_the_source(values, pattern):
    with pytest.raises(UserError, match=r"^my.yaml: " + pattern):
        TrainConfig.from_dict(values, source="my.yaml")


def test_lists_from_strings_ints_for_floats_and_nulls():
    cfg = TrainConfig.from_dict({"target_modules": "query, value,", "lr": 1, "rank": None, "budget": None})
    assert cfg.target_modules == ["query", "value"] and cfg.lr == 1.0 and isinstance(cfg.lr, float)


# ---- files -----------------------------------------------------------------------------------------


def test_yaml_and_json_files_with_dashes(tmp_path):
    y = tmp_path / "a.yaml"
    y.write_text("method: fwlora\nlambda-fw: 0.001\nfw_beta: 0.9\n", encoding="utf-8")
    j = tmp_path / "a.json"
    j.write_text(json.dumps({"method": "fwlora", "lambda-fw": 0.001, "fw_beta": 0.9}), encoding="utf-8")
    assert load_config_file(y) == load_config_file(j) == {"method": "fwlora", "lambda_fw": 0.001, "fw_beta": 0.9}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n", encoding="utf-8")
    assert load_config_file(empty) == {}



def test_yaml_reads_only_true_and_false_as_booleans(tmp_path):
    """YAML 1.1 reads `no` as False, which made `mixed_precision: no` (and `--set mixed_precision=no`) an error."""
    from fwlora.bench import load_preset
    from fwlora.cli.flags import parse_sets

    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\ngradient_checkpointing: false\ntask: yes\nmethod: On\n", encoding="utf-8")
    assert load_config_file(path) == {"mixed_precision": "no", "gradient_checkpointing": False, "task": "yes", "method": "On"}
    assert TrainConfig.from_dict({"mixed_precision": "no"}).mixed_precision == "no"
    assert parse_sets(["mixed_precision=no", "gradient_checkpointing=True", "lr=1e-3"]) == {
        "mixed_precision": "no", "gradient_checkpointing": True, "lr": "1e-3"}
    preset = tmp_path / "p.yaml"
    preset.write_text("grid: {tasks: [cola]}\ntrain: {mixed_precision: no}\n", encoding="utf-8")
    assert load_preset(str(preset))["train"]["mixed_precision"] == "no"
    assert yaml.safe_load("a: no") == {"a": False}  # what plain PyYAML does, so the test can fail

@pytest.mark.parametrize("name, content, pattern", [
    ("list.yaml", "- a\n- b\n", r"expected a mapping of settings, got list"),
    ("scalar.yaml", "3\n", r"expected a mapping of settings, got int"),
    ("intkeys.yaml", "1: a\n", r"expected a mapping of settings"),
    ("broken.yaml", "a: [1, 2\n", r"not valid YAML"),
    ("broken.json", "{'a': 1}", r"not valid JSON"),
    ("hugeint.json", '{"epochs": ' + "1" * 5000 + "}", r"not valid JSON"),
    ("hugeint.yaml", "epochs: " + "1" * 5000 + "\n", r"not valid YAML"),
    ("latin1.yaml", b"task: caf\xe9\n", r"cannot read it"),
])
def test_bad_config_file_is_one_user_error(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(UserError, match=r"^config file .*" + name + ": " + pattern):
        load_config_file(path)


def test_missing_config_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="cannot read it"):
        load_config_file(tmp_path)


def test_flags_override_the_file_and_rank_replaces_budget(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nbudget: 0.2\nepochs: 5\n", encoding="utf-8")
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "2", "--rank", "3"])
    values = collect_train_settings(args)
    assert values == {"lr": 0.001, "epochs": 2, "rank": 3}
    assert TrainConfig.from_dict(values).rank == 3


def test_cli_bad_config_file_exits_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("fw-beta: 1.5\n", encoding="utf-8")
    assert main(["train", "--config", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "fwlora: error: fw-beta = 1.5: must lie strictly between 0 and 1\n"
    path.write_text("epoch: 3\n", encoding="utf-8")
    assert main(["train", "--config", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fwlora: error: {path}: unknown setting(s) epoch;") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# ---- property-based ----------------------------------------------------------------------------------

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 600), st.sampled_from([10**400, -2**1100]),
                     st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.text(max_size=8),
                     st.sampled_from(["lora", "adalora", "fwlora", "cola", "exact", "sketch", "sum", "max", "no",
                                      "bf16", "auto", "mean", "query,value"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                                max_size=3), max_leaves=6)
_KEYS = st.sampled_from(sorted(FIELDS)) | st.text(max_size=10)


def _build(values):
    try:
        return TrainConfig.from_dict(values, source="prop")
    except UserError as e:
        assert str(e), "an empty message"
        return None


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_random_mappings_give_a_config_or_a_user_error(values):
    cfg = _build(values)
    if cfg is not None:
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # what was accepted is valid as a whole


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)), _SCALARS, min_size=1, max_size=5))
def test_random_known_settings_give_a_config_or_a_user_error(values):
    _build(values)


def _load(path):
    try:
        data = load_config_file(path)
    except UserError:
        return
    assert isinstance(data, dict) and all(isinstance(k, str) for k in data)
    _build(data)


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=80),
                      st.lists(st.sampled_from(["epochs: ", "lr: ", "method", ":", " ", "\n", "- ", "[", "]", "{", "}",
                                                "1", "2.5", "-3", ".nan", "null", "true", "fwlora", "'", '"', "\t",
                                                "&a ", "*a", "!!python/object:os.system", "1e400", ",", "#"]),
                               max_size=25).map("".join)),
       suffix=st.sampled_from([".yaml", ".json", ".yml"]))
def test_random_file_contents_give_settings_or_a_user_error(tmp_path_factory, text, suffix):
    path = tmp_path_factory.getbasetemp() / f"random{suffix}"
    path.write_text(text, encoding="utf-8")
    _load(path)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=5), st.booleans())
def test_random_mappings_written_as_yaml_or_json(tmp_path_factory, values, as_json):
    path = tmp_path_factory.getbasetemp() / ("m.json" if as_json else "m.yaml")
    path.write_text(json.dumps(values) if as_json else yaml.safe_dump(values), encoding="utf-8")
    _load(path)


# ---- the task's name with your own data, typed method settings -----------------------------------------------


@pytest.mark.parametrize("extra, task", [([], "x"), (["--task", "cola"], "cola"), (["--task", "sst2"], "sst2")])
def test_own_data_is_named_after_the_file_unless_task_is_given(extra, task):
    args = build_parser().parse_args(["train", "--dataset", "data/x.csv", *extra])
    cfg = TrainConfig.from_dict(collect_train_settings(args))
    assert cfg.task == task
    assert TrainConfig.from_dict(cfg.to_dict()).task == task  # as config.json keeps it
    assert TrainConfig.from_dict({"task": "cola", "dataset": "x.csv"}).task == "cola"  # a config file's too


def test_method_settings_are_the_methods_typed_settings():
    from fwlora import methods

    cfg = TrainConfig.from_dict({"method": "fwlora", "fw_beta": 0.9, "fw_warmup_steps": 4})
    settings_class = methods.get("fwlora").Settings
    assert cfg.method_settings == settings_class(beta=0.9, warmup_steps=4)  # built directly, independently
    assert cfg.method_settings.measure_every == 4  # resolved there: min(8, K) ...
    assert cfg.to_dict()["fw_measure_every"] is None  # ... while the config keeps what was given
    assert cfg.replace(fw_warmup_steps=2).method_settings.measure_every == 2
    assert not hasattr(cfg, "lambda_fw")  # a method's setting is read from method_settings, not the config


def test_values_are_converted_by_the_settings_real_types():
    from fwlora.config import setting_types

    types = setting_types()
    assert types["rank"] == (int | None) and types["lr"] is float and types["target_modules"] == (list[str] | None)
    assert types["fw_warmup_steps"] == (int | float)
    cfg = TrainConfig.from_dict({"method": "fwlora", "fw_warmup_steps": "0.25", "lambda_fw": 1, "rank": 2})
    assert cfg.method_settings.warmup_steps == 0.25 and isinstance(cfg.method_settings.lambda_fw, float)
