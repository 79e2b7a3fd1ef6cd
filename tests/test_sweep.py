"""`fwlora sweep`: the search space (the default, the registry's and plug-ins' entries, space files, bad
entries) and the command line's flags, on a small slice of the shared GLUE copy.

The helpers here (the tiny space, the slice, `fake_train`, a stand-in for `train` that is instant and
deterministic) are shared with test_sweep_runner.py, which tests running the trials.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from fwlora import methods, sweep
from fwlora.cli import build_parser
from fwlora.cli import sweep as sweep_cli
from fwlora.config import TrainConfig
from fwlora.errors import UserError
from fwlora.methods import Method
from fwlora.records import RunRecord, Status

REPO = Path(__file__).resolve().parents[1]

# a tiny space: fast runs (rank 1 or 2), a warm-up that fits in the 4 optimizer steps or not at all
TINY_SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
    "rank": {"type": "categorical", "choices": [1, 2]},
    "lambda_fw": None,
    "batch_size": None,
    "fw_warmup_steps": {"type": "categorical", "choices": [1, 2], "methods": ["fwlora"]},
}
# 32 examples, batch 16, 2 epochs: 4 optimizer steps per run
SLICE = {"task": "cola", "train_limit": 32, "eval_limit": 32, "epochs": 2, "max_length": 16, "batch_size": 16,
         "threads": 1}


def slice_flags(glue_dir: Path) -> list[str]:
    flags = ["--data-dir", str(glue_dir)]
    for key, value in SLICE.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def write_space(tmp_path: Path, space: dict = TINY_SPACE) -> Path:
    path = tmp_path / "space.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space))
    return path


def make_config(tmp_path: Path, glue_dir: Path, methods=("lora",), trials: int = 3, space: dict = TINY_SPACE,
                **kw) -> sweep.SweepConfig:
    return sweep.SweepConfig(methods=list(methods), settings={**SLICE, "data_dir": str(glue_dir)},
                             space=sweep.load_space(write_space(tmp_path, space)), trials=trials,
                             output_dir=str(tmp_path / "out"), **kw)


# release 1's DEFAULT_SPACE (the seed's ranges, docs/method.md): the registry-built default must reproduce it
RELEASE1_DEFAULT_SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-4, "log": True},
    "lambda_fw": {"type": "float", "low": 5e-5, "high": 5e-4, "log": True, "methods": ["fwlora"]},
    "rank": {"type": "categorical", "choices": [4, 8, 16]},
    "fw_warmup_steps": {"type": "categorical", "choices": [300, 500, 800], "methods": ["fwlora"]},
    "batch_size": {"type": "categorical", "choices": [16, 32, 64]},
}


def fake_train(cfg: TrainConfig, overwrite: bool = False, on_epoch_end=None) -> RunRecord:
    """Instant and deterministic: the metric peaks at lr = 3e-4 and grows with rank and epoch."""
    history = []
    for epoch in range(1, cfg.epochs + 1):
        value = 0.5 - abs(math.log(cfg.lr / 3e-4)) / 10 + 0.01 * (cfg.rank or 0) + 0.02 * epoch + 0.001 * cfg.seed
        entry = {"epoch": epoch, "mcc": value, "accuracy": value}
        history.append(entry)
        if on_epoch_end:
            on_epoch_end(entry)
    return RunRecord(status=Status.COMPLETE, task=cfg.task, method=cfg.method, seed=cfg.seed, config=cfg.to_dict(),
                     metric="mcc", final=history[-1], best=max(history, key=lambda h: h["mcc"]), epochs=history,
                     timing={"train_seconds": 0.0})


def load(cfg: sweep.SweepConfig, method: str = "lora") -> optuna.Study:
    storage = sweep.open_storage(cfg.storage, Path(cfg.output_dir)).storage
    return optuna.load_study(study_name=cfg.study_name(method), storage=storage)


def snapshot(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.value) for t in study.trials]


# ---- the search space ------------------------------------------------------------------------------


def test_default_space_is_method_md_ranges():
    space = sweep.load_space(None)
    assert space["lr"] == sweep.Param("lr", "float", low=1e-4, high=3e-4, log=True)
    assert space["lambda_fw"] == sweep.Param("lambda_fw", "float", low=5e-5, high=5e-4, log=True, methods=("fwlora",))
    assert space["rank"].choices == (4, 8, 16)
    assert space["fw_warmup_steps"].choices == (300, 500, 800) and space["fw_warmup_steps"].methods == ("fwlora",)
    assert space["batch_size"].choices == (16, 32, 64)
    cfg = sweep.SweepConfig(methods=["lora", "fwlora"], settings={})
    assert set(cfg.space_for("lora")) == {"lr", "rank", "batch_size"}
    assert set(cfg.space_for("fwlora")) == {"lr", "rank", "batch_size", "lambda_fw", "fw_warmup_steps"}
    # the example file is the default, spelled out
    assert sweep.load_space(REPO / "examples" / "sweep_space.yaml") == space


def test_default_space_comes_from_the_registry_and_equals_release_1():
    """Shared entries plus each method's own search_space, restricted to it: for lora, adalora and fwlora
    exactly release 1's hard-coded DEFAULT_SPACE."""
    assert methods.get("fwlora").search_space == {
        "lambda_fw": {"type": "float", "low": 5e-5, "high": 5e-4, "log": True},
        "fw_warmup_steps": {"type": "categorical", "choices": [300, 500, 800]}}
    release1 = sweep.parse_space(RELEASE1_DEFAULT_SPACE, "release 1")
    space = sweep.default_space()
    for method in ("lora", "adalora", "fwlora"):
        mine = {n: p for n, p in space.items() if p.applies_to(method)}
        assert mine == {n: p for n, p in release1.items() if p.applies_to(method)}, method
    # every entry a method brings is searched in its own study only
    for name, p in space.items():
        if name not in sweep.SHARED_SPACE:
            assert p.methods is not None and len(p.methods) == 1 and name in methods.get(p.methods[0]).search_space
    # a study of these methods is identified as in release 1 (continuing an old study is accepted)
    cfg = sweep.SweepConfig(methods=["lora", "adalora", "fwlora"], settings={})
    old = sweep.SweepConfig(methods=["lora", "adalora", "fwlora"], settings={}, space=release1)
    assert all(cfg.identity(m) == old.identity(m) for m in cfg.methods) and cfg.space == release1


class Picky(Method):
    """A plug-in method whose own check refuses runs under 100 optimizer steps; brings its own space entry."""

    name, label = "picky", "Picky"
    search_space = {"lora_dropout": {"type": "categorical", "choices": [0.0, 0.1]}}

    def check(self) -> list[str]:
        if self.run.total_steps < 100:
            raise UserError(f"picky needs 100 optimizer steps, this run has {self.run.total_steps}")
        return []


@pytest.fixture
def picky():
    methods.register(Picky)
    try:
        yield Picky
    finally:
        methods.REGISTRY.pop("picky", None)


def test_a_plugin_method_brings_its_space_and_its_own_infeasibility_check(tmp_path, glue_dir, picky):
    space = sweep.default_space()
    assert space["lora_dropout"] == sweep.Param("lora_dropout", "categorical", choices=(0.0, 0.1), methods=("picky",))
    assert "lora_dropout" not in sweep.SweepConfig(methods=["lora"], settings={}).space
    parser = build_parser()
    cfg = sweep_cli.config_from_args(parser.parse_args(["sweep", "--methods", "lora,picky"]))
    assert cfg.methods == ["lora", "picky"] and set(cfg.space_for("picky")) == {"lr", "rank", "batch_size", "lora_dropout"}
    assert "picky" in parser._subparsers._group_actions[0].choices["sweep"].format_help()
    trained = []

    def train_fn(cfg, overwrite=False, on_epoch_end=None):
        trained.append(cfg.method)
        return fake_train(cfg, overwrite, on_epoch_end)

    cfg = make_config(tmp_path, glue_dir, methods=["picky", "lora"], trials=2)
    sweep.run_sweep(cfg, train_fn=train_fn)
    picky_trials = load(cfg, "picky").trials
    assert trained == ["lora", "lora"]  # the method's check, not its name, decided: never trained
    assert [t.state for t in picky_trials] == [TrialState.PRUNED] * 2
    assert all("picky needs 100 optimizer steps, this run has 4" in t.user_attrs["infeasible"] for t in picky_trials)
    assert [t.state for t in load(cfg, "lora").trials] == [TrialState.COMPLETE] * 2


def test_a_method_setting_is_searched_in_its_method_only(tmp_path):
    space = sweep.load_space(write_space(tmp_path, {"fw_beta": {"type": "float", "low": 0.9, "high": 0.99}}))
    assert space["fw_beta"].methods == ("fwlora",)  # no methods: key: its owner's study only
    with pytest.raises(UserError, match="a setting of method fwlora only"):
        sweep.load_space(write_space(tmp_path, {"fw_beta": {"type": "float", "low": 0.9, "high": 0.99,
                                                            "methods": ["lora", "fwlora"]}}))


def test_space_file_replaces_entries_and_drops_nulls(tmp_path):
    path = write_space(tmp_path, {"lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                                  "batch-size": None, "lora_dropout": {"type": "categorical", "choices": [0.0, 0.1]},
                                  "fw_warmup_steps": {"type": "int", "low": 10, "high": 50, "step": 10,
                                                      "methods": ["fwlora"]}})
    space = sweep.load_space(path)
    assert space["lr"].low == 1e-5 and "batch_size" not in space and space["lora_dropout"].choices == (0.0, 0.1)
    assert space["fw_warmup_steps"] == sweep.Param("fw_warmup_steps", "int", low=10, high=50, step=10,
                                                   methods=("fwlora",))
    assert "rank" in space and "lambda_fw" in space
    # YAML 1.1 reads 1e-4 (no dot) as a string; the space takes it as the number meant
    (tmp_path / "plain.yaml").write_text("lr: {type: float, low: 1e-4, high: 3e-4, log: true}\n"
                                         "lambda_fw: {type: categorical, choices: [1e-4, 2e-4], methods: [fwlora]}\n")
    space = sweep.load_space(tmp_path / "plain.yaml")
    assert space["lr"].low == 1e-4 and space["lambda_fw"].choices == (1e-4, 2e-4)


@pytest.mark.parametrize("entry, message", [
    ({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}, "not a training setting"),
    ({"seed": {"type": "categorical", "choices": [0, 1]}}, "cannot be searched"),
    ({"lr": {"type": "uniform", "low": 1e-4, "high": 1e-3}}, "type must be one of"),
    ({"lr": {"type": "float", "low": 1e-3, "high": 1e-4}}, "must be below high"),
    ({"lr": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "log scale needs low > 0"),
    ({"lr": {"type": "float", "low": 1e-4, "hi": 1e-3}}, "unknown key(s) hi"),
    ({"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True, "step": 1e-4}}, "not both"),
    ({"lr": [1e-4, 1e-3]}, "expected a mapping"),
    ({"rank": {"type": "float", "low": 1, "high": 8}}, "integer setting"),
    ({"rank": {"type": "int", "low": 1.5, "high": 8}}, "integer low and high"),
    ({"rank": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"rank": {"type": "categorical", "choices": [4, 4]}}, "repeat"),
    ({"rank": {"type": "categorical", "choices": [4, 8], "low": 1}}, "takes choices"),
    ({"fw_estimator": {"type": "float", "low": 0.1, "high": 1.0}}, "only be searched as type categorical"),
    ({"lambda_fw": {"type": "float", "low": 1e-5, "high": 1e-4, "methods": ["dora"]}}, "methods must be"),
    ({"budget": {"type": "categorical", "choices": [0.1, 0.2]}}, "rank or budget, not both"),
])
def test_bad_space_entries_are_user_errors(tmp_path, entry, message):
    with pytest.raises(UserError) as info:
        sweep.load_space(write_space(tmp_path, entry))
    assert message in str(info.value) and "space file" in str(info.value)


def test_space_values_are_checked_against_train_config_before_any_trial(tmp_path, glue_dir):
    cfg = make_config(tmp_path, glue_dir, space={"lora_dropout": {"type": "categorical", "choices": [0.0, 1.5]}})
    with pytest.raises(UserError, match="lora_dropout = 1.5 is not a valid setting"):
        sweep.Sweep(cfg, train_fn=fake_train).preflight()


def test_every_registered_method_s_own_space_is_valid_training_settings(tmp_path, glue_dir):
    """The preflight builds a TrainConfig from every value of every entry (the LoRA family's, GoRA's, spectral
    widecut's): a space entry that no run could take fails here, not in trial 1 of a user's sweep."""
    cfg = sweep.SweepConfig(methods=methods.names(), settings={**SLICE, "data_dir": str(glue_dir)},
                            space=sweep.default_space(), trials=1, output_dir=str(tmp_path / "out"))
    sweep.Sweep(cfg, train_fn=fake_train).preflight()
    owned = {name for name, p in cfg.space.items() if p.methods}
    assert owned == {key for m in methods.names() for key in methods.get(m).search_space} >= {"specwide_gamma"}


def test_command_line_flags_fix_their_settings(tmp_path):
    def parse(*argv):
        return sweep_cli.config_from_args(build_parser().parse_args(["sweep", *argv]))

    cfg = parse("--rank", "2", "--lr", "1e-4", "--methods", "lora,fwlora", "--output-dir", str(tmp_path))
    assert cfg.methods == ["lora", "fwlora"] and set(cfg.space) == {"lambda_fw", "fw_warmup_steps", "batch_size"}
    assert "fw_warmup_steps" not in parse("--fw-warmup-steps", "300", "--methods", "fwlora").space  # a method's flag too
    assert cfg.settings["rank"] == 2 and cfg.study_name("fwlora") == "cola-fwlora"
    assert "rank" not in parse("--budget", "0.2").space
    config = tmp_path / "base.yaml"
    config.write_text("lr: 5.0e-4\nmethod: fwlora\noutput_dir: elsewhere\n")
    cfg = parse("--config", str(config), "--study-name", "exp1", "--task", "sst2")
    assert cfg.methods == ["fwlora"] and "lr" in cfg.space  # a config file's values do not fix the space
    assert cfg.study_name("fwlora") == "exp1-sst2-fwlora" and "output_dir" not in cfg.settings
    with pytest.raises(UserError, match="--method or --methods"):
        parse("--method", "lora", "--methods", "lora,fwlora")
    with pytest.raises(UserError, match="unknown method"):
        parse("--methods", "lora,nosuch")
    help_text = build_parser()._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "postgresql://" in help_text and "--seeds-per-trial" in help_text and "--lambda-fw" in help_text
    assert "--heartbeat-seconds" in help_text and "fw_warmup_steps: {type: categorical, choices: [300, 500, 800]" in help_text
    assert all(m in help_text for m in methods.names())  # --methods lists the registry


def test_heartbeat_and_grace_come_from_flags_or_the_environment(tmp_path, monkeypatch):
    def parse(*argv):
        return sweep_cli.config_from_args(build_parser().parse_args(["sweep", "--output-dir", str(tmp_path), *argv]))

    cfg = parse()
    assert (cfg.heartbeat_seconds, cfg.grace_seconds) == (sweep.HEARTBEAT_SECONDS, sweep.GRACE_SECONDS) == (60, 300)
    monkeypatch.setenv(sweep.HEARTBEAT_ENV, "2")
    monkeypatch.setenv(sweep.GRACE_ENV, "6")
    assert (parse().heartbeat_seconds, parse().grace_seconds) == (2, 6)
    assert parse("--heartbeat-seconds", "3", "--grace-seconds", "9").grace_seconds == 9
    with pytest.raises(UserError, match="must exceed --heartbeat-seconds"):
        parse("--grace-seconds", "2")
    monkeypatch.setenv(sweep.GRACE_ENV, "soon")
    with pytest.raises(UserError, match="FWLORA_SWEEP_GRACE"):
        parse()
    storage = sweep.open_storage(f"sqlite:///{tmp_path / 'hb.db'}", tmp_path, heartbeat_seconds=2, grace_seconds=6)
    assert storage.storage.get_heartbeat_interval() == 2 and storage.storage.grace_period == 6

