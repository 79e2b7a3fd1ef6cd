"""A method written in one file (this one) runs through `fwlora train`, `bench`, `report` and `sweep` with
no other file changed; and the shape of the package that makes that possible."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fwlora import methods
from fwlora.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "fwlora"


# ---- the whole method, as a user writes it: one file -----------------------------------------------------

MY_METHOD = '''
from dataclasses import dataclass

from fwlora.methods import Method, lora_config, register, with_help


@dataclass
class HalfAlphaSettings:
    scale: float = with_help(0.5, "multiplies LoRA's default alpha (2 x rank)")

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"scale = {self.scale!r}: must be > 0")


@register
class HalfAlphaLoRA(Method):
    """LoRA with a scaled alpha that counts the optimizer steps it is told about."""

    name, label = "halfalpha", "Half-alpha LoRA"
    Settings = HalfAlphaSettings
    prefix = "half_"
    search_space = {"half_scale": {"type": "float", "low": 0.25, "high": 1.0}}

    def build(self, model):
        from peft import get_peft_model

        self.steps_seen = 0
        self.alpha = self.settings.scale * 2.0 * self.run.rank
        return get_peft_model(model, lora_config(self.run, self.run.rank, self.alpha))

    def after_optimizer_step(self, step):
        assert step == self.steps_seen  # 0-based, once per optimizer step
        self.steps_seen += 1
        return False

    def summary(self):
        return {"lora_alpha": self.alpha, "steps_seen": self.steps_seen}
'''


# a method that says how the report should show it: colour, time claim, a rank column and its figure
MY_RANKED = '''
from fwlora.methods import Method, TimeHypothesis, lora_config, register


@register
class RankedLoRA(Method):
    name, label = "ranked", "Ranked LoRA"
    colour, line_style = "tab:purple", (":", "P")
    time_hypothesis = TimeHypothesis(1.05, limit=1.06, source="this test")
    rank_column, rank_unit = "ranked_rank", "units"
    importance_column = "ranked_importance"
    figures = ("ranks", "importance")

    def build(self, model):
        from peft import get_peft_model

        return get_peft_model(model, lora_config(self.run, self.run.rank, 2.0 * self.run.rank))

    def matrix_columns(self):
        layers = [n.removeprefix("base_model.model.") for n, m in self.model.named_modules()
                  if hasattr(m, "lora_A") and "classifier" not in n and hasattr(m, "r")]
        return {"ranked_rank": {n: (i % 3) for i, n in enumerate(layers)},
                "ranked_importance": {n: 1.0 / len(layers) for n in layers}}
'''


@pytest.fixture
def ranked(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "ranked.py"
    path.write_text(MY_RANKED)
    methods.load_plugins(str(path))
    yield path
    methods.REGISTRY.pop("ranked", None)
    sys.modules.pop("fwlora_plugin_ranked", None)


def test_a_method_defined_here_gets_its_colour_columns_verdicts_and_figures(ranked, glue_dir, tmp_path):
    from fwlora.report.plots import _colour, _style

    bench = tmp_path / "bench"
    sets = ["--set", "train_limit=48", "--set", "eval_limit=32", "--set", "max_length=24", "--set", "epochs=1",
            "--set", "batch_size=16", "--set", "lr=1e-3", "--set", "threads=1", "--set", "report_to=none"]
    assert main(["bench", "--tasks", "cola", "--methods", "lora,adalora,ranked", "--ranks", "2", "--seeds", "2",
                 "--data-dir", str(glue_dir), "--output-dir", str(bench), *sets]) == 0
    report = (bench / "report" / "report.md").read_text()
    summary = json.loads((bench / "report" / "summary.json").read_text())["protocols"][0]
    assert summary["methods"] == ["lora", "adalora", "ranked"] and summary["rival"] == "adalora"
    assert "Ranked LoRA time / LoRA" in report and "Ranked LoRA − AdaLoRA [95 % CI]" in report  # its columns
    verdict = next(line for line in report.splitlines() if line.startswith("- **Verdict**: Ranked LoRA vs AdaLoRA"))
    assert "hypothesis: ~1.05x, met if <= 1.06x):" in verdict
    assert "Ranked LoRA's final rank pattern (units per matrix" in report
    plots = summary["plots"]
    assert any(name.endswith("_ranked_ranks.png") for name in plots["ranks"])
    assert any(name.endswith("_importance.png") for name in plots["importance"])
    labels = summary["methods"]
    assert _colour("ranked", labels) == "tab:purple" and _style("ranked", labels) == (":", "P")
    assert _colour("lora", labels) == "tab:blue" and _colour("adalora", labels) == "tab:orange"


@pytest.fixture
def plugin(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "my_method.py"
    path.write_text(MY_METHOD)
    methods.load_plugins(str(path))  # what $FWLORA_METHODS does
    yield path
    methods.REGISTRY.pop("halfalpha", None)
    sys.modules.pop("fwlora_plugin_my_method", None)


TINY = ["--train-limit", "48", "--eval-limit", "32", "--max-length", "24", "--epochs", "1", "--batch-size", "16",
        "--lr", "1e-3", "--threads", "1", "--eval-batch-size", "32"]


def test_a_method_in_one_file_trains(plugin, glue_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--task", "cola", "--method", "halfalpha", "--half-scale", "0.25", "--rank", "2",
                 "--data-dir", str(glue_dir), "--output-dir", str(out), *TINY]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["schema_version"] == 2 and result["status"] == "complete" and result["method"] == "halfalpha"
    assert result["method_info"] == {"lora_alpha": 1.0, "steps_seen": 3}  # 0.25 x 2 x rank 2; 48 / 16 steps
    assert result["config"]["half_scale"] == 0.25
    assert main(["train", "--method", "halfalpha", "--half-scale", "-1", "--output-dir", str(tmp_path / "bad")]) == 2


def test_a_method_in_one_file_runs_through_bench_report_and_sweep(plugin, glue_dir, tmp_path):
    bench = tmp_path / "bench"
    sets = ["--set", "train_limit=48", "--set", "eval_limit=32", "--set", "max_length=24", "--set", "epochs=1",
            "--set", "batch_size=16", "--set", "lr=1e-3", "--set", "threads=1"]
    assert main(["bench", "--tasks", "cola", "--methods", "lora,halfalpha", "--ranks", "2", "--seeds", "2",
                 "--data-dir", str(glue_dir), "--output-dir", str(bench), *sets]) == 0
    report = (bench / "report" / "report.md").read_text()
    assert "Half-alpha LoRA" in report
    assert any("Half-alpha LoRA − LoRA" in line or "Half-alpha LoRA - LoRA" in line for line in report.splitlines())
    out = tmp_path / "report2"
    assert main(["report", str(bench), "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "halfalpha" in json.dumps(summary)

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--task", "cola", "--methods", "halfalpha", "--trials", "2", "--rank", "2",
                 "--data-dir", str(glue_dir), "--output-dir", str(sweep), "--space", str(_space(tmp_path)),
                 *TINY]) == 0
    best = yaml.safe_load((sweep / "best_halfalpha.yaml").read_text())
    assert 0.25 <= best["half_scale"] <= 1.0 and best["method"] == "halfalpha"


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text("lr: null\nrank: null\nbatch_size: null\n")  # only the method's own half_scale is searched
    return path


def test_plugins_from_the_environment_get_a_method_choice(plugin):
    """$FWLORA_METHODS names a user's file; `fwlora train --help` then lists its settings."""
    env = {**os.environ, "FWLORA_METHODS": str(plugin)}
    out = subprocess.run([sys.executable, "-m", "fwlora", "train", "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Half-alpha LoRA settings" in out.stdout and "--half-scale" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fwlora", "train", "--help"], capture_output=True, text=True,
                         env={**os.environ, "FWLORA_METHODS": str(plugin.parent / "missing.py")}, timeout=120)
    assert bad.returncode == 2 and "cannot import" in bad.stderr and "Traceback" not in bad.stderr


# ---- the shape ---------------------------------------------------------------------------------------------


def test_the_training_loop_never_asks_which_method_it_runs():
    source = (SRC / "train.py").read_text()
    tree = ast.parse(source)
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    # ("fwlora" is also the package whose version the run records)
    assert not literals & (set(methods.names()) - {"fwlora"}), "train.py names a method"
    for node in ast.walk(tree):  # no `cfg.method == ...`, `method in (...)`
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            assert not any(isinstance(x, ast.Attribute) and x.attr == "method" or isinstance(x, ast.Name) and x.id == "method"
                           for x in sides), f"train.py line {node.lineno} tests the method"


def test_no_module_outside_methods_names_a_method():
    """The registry answers every per-method question: no method's name is a string literal outside methods/
    (the package's own name aside, where it is the program's: there it comes from __name__)."""
    builtin = {"lora", "adalora", "fwlora", "fwrank"}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if rel.parts[0] in ("methods", "presets"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        literals = [(node.lineno, node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
                    and isinstance(node.value, str) and id(node) not in docstrings]
        named = [(line, v) for line, v in literals if v in builtin]
        assert not named, f"{rel} names a method: {named}"


def test_no_module_imports_the_cli_and_no_file_is_long():
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        lines = path.read_text().splitlines()
        assert len(lines) <= 460, f"{rel} has {len(lines)} lines"
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("fwlora.cli"), f"{rel} imports {node.module}"
                assert not (node.module == "fwlora" and any(a.name == "cli" for a in node.names)), f"{rel} imports the cli"


def test_import_fwlora_leaves_the_experiment_system_unimported():
    code = ("import sys, fwlora; from fwlora import FisherWeightedLoRA, FisherRankAllocation; "
            "print(sorted(m for m in ('optuna', 'matplotlib', 'datasets', 'accelerate', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_method_settings_come_from_the_methods_dataclasses():
    from fwlora import FWRankConfig
    from fwlora import FWLoRAConfig

    settings = methods.all_settings()
    for field_name in FWLoRAConfig.__dataclass_fields__:
        if field_name != "seed":
            key = methods.get("fwlora").flat_name(field_name)
            cls, f = settings[key]
            assert cls.name == "fwlora" and f.metadata["help"] == FWLoRAConfig.__dataclass_fields__[field_name].metadata["help"]
    for field_name in FWRankConfig.__dataclass_fields__:
        if field_name not in ("seed", "target_rank"):
            assert settings["fwrank_" + field_name][0].name == "fwrank"


def test_the_readme_ten_line_method_trains(glue_dir, tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("# my_method.py\n", 1)[1].split("```", 1)[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 11
    path = tmp_path / "readme_method.py"
    path.write_text(code)
    methods.load_plugins(str(path))
    try:
        out = tmp_path / "run"
        assert main(["train", "--task", "sst2", "--method", "halfalpha", "--half-scale", "0.25", "--rank", "2",
                     "--data-dir", str(glue_dir), "--output-dir", str(out), *TINY]) == 0
        assert json.loads((out / "result.json").read_text())["budget"]["rank"] == 2
    finally:
        methods.REGISTRY.pop("halfalpha", None)
        sys.modules.pop("fwlora_plugin_readme_method", None)
