"""PEFT's LoRA family as methods (rsLoRA, DoRA, PiSSA, OLoRA, LoRA-GA, EVA, LoRA+), on a tiny random BERT, and
our gradient-started methods (GoRA, LoRA-One, spectral widecut) where a test is the same for them:
- each one's first optimizer steps through fwlora's setup and loop equal PEFT used directly, by hand (same seed,
  same batches in the loop's order; PEFT's configs, preprocess_loraga and initialize_lora_eva_weights called
  here, LoRA+'s groups written by hand with the head at lr): the same losses and weights;
- `fwlora train --method X` runs, and the saved run loads back (load_run) and merges (export_run) with the logits
  the model had when training ended (PiSSA, OLoRA and LoRA-GA through PEFT's conversion to a plain LoRA on the
  untouched backbone, head included; GoRA's per-matrix ranks and spectral widecut's after its cut);
- the trained parameters match a hand count from the model's dimensions (DoRA's magnitudes, EVA's and GoRA's
  ranks, spectral widecut's wide phase and its cut);
- the recorded dW of an initialisation that starts away from zero is the update training made;
- a quantized backbone is refused in one line where PEFT cannot build the method; a real bench (with GoRA,
  LoRA-One and spectral widecut), its report and a sweep run every one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import write_synthetic_glue

from fwlora import methods
from fwlora.cli import main
from fwlora.config import TrainConfig
from fwlora.errors import UserError
from fwlora.methods.base import RunInfo
from fwlora.trainer import EpochSampler, StopSignals, Trainer

FAMILY = ["rslora", "dora", "pissa", "olora", "loraga", "eva", "loraplus"]
OURS = ["gora", "loraone", "specwide"]  # not in PEFT: saved, loaded, merged and counted the same way
OWN = {"loraga": {"loraga_batches": 2}, "eva": {"eva_batches": 2}, "gora": {"gora_batches": 2},  # short passes
       "loraone": {"loraone_batches": 2}, "specwide": {"specwide_batches": 2, "specwide_cut_at": 2}}
RANK, ALPHA, LR, STEPS = 2, 4.0, 5e-3, 3
HIDDEN, INTERMEDIATE, LAYERS = 32, 48, 2
TEXTS = ["the film was good", "a dull and boring book", "the city at night"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random BERT with its own head, no dropout, and the bundled MiniLM tokenizer, saved like a hub model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fwlora.models import resolve_backbone

    path = tmp_path_factory.mktemp("model") / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    return write_synthetic_glue(tmp_path_factory.mktemp("glue"), {"cola": (32, 16)})


def settings(tiny_dir: Path, glue: Path, out: Path, method: str) -> dict:
    return {"model": str(tiny_dir), "task": "cola", "data_dir": str(glue), "method": method, "rank": RANK,
            "train_limit": 32, "eval_limit": 16, "max_length": 16, "batch_size": 8, "epochs": 1, "lr": LR,
            "threads": 1, "report_to": "none", "output_dir": str(out), **OWN.get(method, {})}


# ---- the first steps against PEFT used directly -------------------------------------------------------------

def peft_by_hand(method: str, tiny_dir: Path, seed: int, targets: list[str], heads: list[str], batches: list[dict]):
    """PEFT's own recipe for each method, as its documentation writes it: (model, optimizer)."""
    from peft import EvaConfig, LoraConfig, LoraGAConfig, get_peft_model, initialize_lora_eva_weights, preprocess_loraga
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=2)
    extra = {"rslora": {"use_rslora": True}, "dora": {"use_dora": True},
             "pissa": {"init_lora_weights": "pissa_niter_4"}, "olora": {"init_lora_weights": "olora"},
             "loraga": {"init_lora_weights": "lora_ga", "lora_ga_config": LoraGAConfig()},
             "eva": {"init_lora_weights": "eva", "eva_config": EvaConfig(use_label_mask=False)},
             "loraplus": {}}[method]
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0, modules_to_save=heads,
                        **extra)
    if method == "loraga":
        def train_step():
            for b in batches[:2]:
                base(**b).loss.backward()

        preprocess_loraga(base, config, train_step)
    model = get_peft_model(base, config)
    if method == "eva":
        initialize_lora_eva_weights(model, dataloader=batches[:2], show_progress_bar=False)
    if method == "loraplus":  # the paper's rule by hand: B at 16 x lr, A and the task head at lr
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trained if "lora_A" in n], "lr": LR},
                  {"params": [p for n, p in trained if "lora_B" in n], "lr": 16.0 * LR},
                  {"params": [p for n, p in trained if ".modules_to_save." in n], "lr": LR}]
        assert sum(len(g["params"]) for g in groups) == len(trained)
        peft_groups = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=16.0).param_groups
        head_bias = next(p for n, p in trained if ".modules_to_save." in n and n.endswith("bias"))
        # why ours moves the head: PEFT's own grouping trains the head's bias at 16 x lr
        assert any(g["lr"] == 16.0 * LR and any(p is head_bias for p in g["params"]) for g in peft_groups)
        return model, torch.optim.AdamW(groups, lr=LR, weight_decay=0.0)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


@pytest.mark.parametrize("method", FAMILY)
def test_first_steps_equal_peft_used_directly(method, tiny_dir, glue, tmp_path):
    from transformers import get_linear_schedule_with_warmup

    from fwlora.train import setup

    cfg = TrainConfig.from_dict(settings(tiny_dir, glue, tmp_path / "run", method))
    s = setup(cfg)
    t = Trainer(s, tmp_path / "run")
    with StopSignals() as stop:
        t.fit(stop, max_steps=STEPS)
    ours = {n: p.detach().clone() for n, p in t.unwrapped.named_parameters() if p.requires_grad}
    our_loss = float(t.loss_sum) / t.loss_count
    t.end()

    loader = torch.utils.data.DataLoader(s.train_data, batch_size=cfg.batch_size,
                                         sampler=EpochSampler(len(s.train_data), cfg.seed),
                                         collate_fn=s.task.collator(s.tokenizer))
    batches = [dict(b) for b in loader]
    model, optimizer = peft_by_hand(method, tiny_dir, cfg.seed, s.targets, s.method.run.modules_to_save, batches)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * s.total_steps), s.total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for b in batches[:STEPS]:
        loss = model(**b).loss
        loss.backward()
        losses.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    theirs = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert {n: tuple(p.shape) for n, p in ours.items()} == {n: tuple(p.shape) for n, p in theirs.items()}
    assert our_loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    for name, value in theirs.items():
        assert torch.allclose(ours[name], value, rtol=1e-5, atol=1e-6), (name, (ours[name] - value).abs().max())


# ---- runs through the CLI: load, merge, count, report ---------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tiny_dir, glue, tmp_path_factory):
    """`fwlora train --method X` for LoRA, the family and ours, with each model's logits on TEXTS when training
    ended (4 optimizer steps: 32 examples in batches of 8)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("runs")
    batch = dict(AutoTokenizer.from_pretrained(tiny_dir)(TEXTS, padding=True, return_tensors="pt"))
    seen: dict[str, torch.Tensor] = {}
    original_end = Trainer.end

    def end(self):  # the trained model as train() is about to save it
        was_training = self.unwrapped.training
        self.unwrapped.eval()
        with torch.no_grad():
            seen[self.cfg.method] = self.unwrapped(**batch).logits.detach().clone()
        self.unwrapped.train(was_training)
        original_end(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "end", end)
        for method in ["lora", *FAMILY, *OURS]:
            own = {"loraga_scale": "weight_svd"} if method == "loraga" else {}  # a start as large as W's top part
            flags = [x for k, v in {**settings(tiny_dir, glue, root / method, method), **own}.items()
                     for x in ("--" + k.replace("_", "-"), str(v))]
            assert main(["train", *flags]) == 0, method
    return root, batch, seen


def record(root: Path, method: str) -> dict:
    return json.loads((root / method / "result.json").read_text())


@pytest.mark.parametrize("method", FAMILY + OURS)
def test_a_saved_run_loads_and_merges_with_the_logits_it_trained_to(method, cli_runs, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from fwlora import load_run
    from fwlora.inference import export_run

    root, batch, seen = cli_runs
    run = load_run(root / method)
    with torch.no_grad():
        loaded = run.model(**batch).logits
    assert torch.allclose(loaded, seen[method], atol=1e-5), (loaded - seen[method]).abs().max()
    # trained to something of its own, that the check above tells from LoRA's (GoRA's small start stays close)
    assert not torch.allclose(seen[method], seen["lora"], atol=1e-5), (seen[method] - seen["lora"]).abs().max()
    merged = AutoModelForSequenceClassification.from_pretrained(export_run(root / method, tmp_path / "m", merged=True))
    with torch.no_grad():
        assert torch.allclose(merged.eval()(**batch).logits, seen[method], atol=1e-5)
    capsys.readouterr()
    assert main(["predict", str(root / method), "--output", str(tmp_path / "p.csv")]) == 0  # the CLI: its metric
    assert f"mcc {record(root, method)['final']['mcc']:.4f}" in capsys.readouterr().err
    adapter = json.loads((root / method / "adapter" / "adapter_config.json").read_text())
    if methods.get(method).timed_init and method != "eva":  # W - s B0 A0: saved as a plain LoRA of rank 2r on W
        assert adapter["r"] == 2 * RANK and adapter["init_lora_weights"] is True


def matrix_sizes() -> dict[str, int]:
    """d_in + d_out of each adapted matrix kind of the tiny BERT."""
    return {"query": 2 * HIDDEN, "key": 2 * HIDDEN, "value": 2 * HIDDEN, "attention.output.dense": 2 * HIDDEN,
            "intermediate.dense": HIDDEN + INTERMEDIATE, "output.dense": INTERMEDIATE + HIDDEN}


def size_of(name: str) -> int:
    sizes = matrix_sizes()
    return sizes[next(k for k in sorted(sizes, key=len, reverse=True) if name.endswith(k))]


def by_ranks(ranks: dict[str, int]) -> int:
    """Adapter parameters of per-matrix ranks: r (d_in + d_out) each."""
    assert len(ranks) == 6 * LAYERS
    return sum(k * size_of(n) for n, k in ranks.items())


@pytest.mark.parametrize("method", ["lora", *FAMILY, *OURS])
def test_trained_parameters_match_a_hand_count(method, cli_runs):
    root, _, _ = cli_runs
    r = record(root, method)
    budget, info = r["budget"], r["method_info"]
    lora = RANK * LAYERS * sum(matrix_sizes().values())  # r (d_in + d_out) per matrix
    assert budget["adapter_params"] == lora  # every method's budget is LoRA's at the rank
    initial = final = None  # where they differ from the parameters trained at the end
    if method == "dora":  # + one magnitude per output row
        expected = lora + LAYERS * (4 * HIDDEN + INTERMEDIATE + HIDDEN)
    elif method in ("eva", "gora"):  # redistributed ranks, their total LoRA's
        ranks = info["ranks"]
        assert sum(ranks.values()) == RANK * 6 * LAYERS
        expected = by_ranks(ranks)
        if method == "eva":
            assert max(ranks.values()) <= 2 * RANK  # rho = 2
        else:  # GoRA fits its ranks to LoRA's parameter count, not only to its total rank
            assert expected == lora
    elif method == "specwide":  # 3 = ceil(1.5 r) wide for its first 2 of 4 steps, then cut to LoRA's budget
        initial, final = 3 * LAYERS * sum(matrix_sizes().values()), by_ranks(info["ranks"])
        assert final <= lora and sum(info["ranks"].values()) <= RANK * 6 * LAYERS
        expected = final
    else:
        expected = lora
    initial, final = initial or expected, final or expected
    assert budget["adapter_trainable_params"] == expected
    assert (budget["trained_adapter_params_initial"], budget["trained_adapter_params_final"]) == (initial, final)
    assert budget["trained_adapter_params_mean"] == pytest.approx((2 * initial + 2 * final) / 4, abs=1e-9)


@pytest.mark.parametrize("method", ["pissa", "olora", "loraga"])
def test_the_recorded_update_is_what_training_changed(method, cli_runs):
    """||dW|| of a residual initialisation is ||s (B A - B0 A0)||: PEFT's converted adapter holds exactly that
    ([B | -B0] [A ; A0] at the same scaling), read here from the saved file, not from the method."""
    from safetensors.torch import load_file

    root, _, _ = cli_runs
    weights = load_file(str(root / method / "adapter" / "adapter_model.safetensors"))
    norms, trained = {}, {}
    for key, a in weights.items():
        if key.endswith("lora_A.weight"):
            b = weights[key.replace("lora_A", "lora_B")].double()
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            norms[name] = float((ALPHA / RANK) * (b @ a.double()).norm())
            trained[name] = float((ALPHA / RANK) * (b[:, :RANK] @ a[:RANK].double()).norm())  # s B A alone
    table = {row["name"]: row["fro_norm"] for row in record(root, method)["matrices"]}
    assert set(table) == set(norms)
    for name, norm in norms.items():
        assert table[name] == pytest.approx(norm, rel=1e-4, abs=1e-7), name
    assert all(abs(trained[n] - norms[n]) > 1e-2 * norms[n] for n in norms)  # s B0 A0 is not negligible


def test_dora_records_its_merged_weight_change(cli_runs, tmp_path):
    """DoRA's dW is W' - W with W' its merged weight: the merged export's weight minus the backbone's."""
    from safetensors.torch import load_file

    from fwlora.inference import export_run

    root, _, _ = cli_runs
    out = export_run(root / "dora", tmp_path / "merged", merged=True)
    merged = load_file(str(out / "model.safetensors"))
    tiny = Path(json.loads((root / "dora" / "config.json").read_text())["config"]["model"])
    base = load_file(str(tiny / "model.safetensors"))
    for row in record(root, "dora")["matrices"]:
        key = row["name"] + ".weight"
        assert row["fro_norm"] == pytest.approx(float((merged[key] - base[key]).double().norm()), rel=1e-3, abs=1e-6)


def test_report_takes_the_family(cli_runs, tmp_path):
    root, _, _ = cli_runs
    assert main(["report", str(root), "--output", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    for method in FAMILY:
        assert methods.label(method) in text
    colours = [methods.get(m).colour for m in methods.names()]
    assert None not in colours and len(set(colours)) == len(colours)


GRADIENT_STARTS = ["gora", "loraone", "specwide"]  # not in PEFT: the first-order initialisations and ours


def test_bench_and_sweep_run_every_family_method_for_real(tiny_dir, glue, tmp_path, capsys):
    """One `fwlora bench --methods lora,rslora,...` trains every method on the tiny model (no dry run), its report
    lists each one with its own trained-parameter count, and `fwlora sweep` runs a trial of each in its own
    search space and writes its best settings."""
    import yaml

    names = ["lora", *FAMILY, *GRADIENT_STARTS]
    shared = ["--set", f"model={tiny_dir}", "--set", "train_limit=32", "--set", "eval_limit=16", "--set", "epochs=1",
              "--set", "batch_size=8", "--set", "max_length=16", "--set", "threads=1", "--set", "report_to=none"]
    bench = tmp_path / "bench"
    assert main(["bench", "--tasks", "cola", "--methods", ",".join(names), "--ranks", "2", "--seeds", "1",
                 "--data-dir", str(glue), "--output-dir", str(bench), *shared]) == 0
    text = (bench / "report" / "report.md").read_text()
    trained = {}
    for method in names:
        found = [json.loads(p.read_text()) for p in bench.glob(f"cola/r2/{method}/seed0/result.json")]
        assert len(found) == 1 and found[0]["status"] == "complete", method
        assert methods.label(method) in text
        trained[method] = found[0]["budget"]["adapter_trainable_params"]
    assert trained["rslora"] == trained["loraplus"] == trained["lora"]  # a scale or an optimizer: LoRA's factors
    assert trained["dora"] > trained["lora"]  # DoRA adds a magnitude per output feature
    capsys.readouterr()

    sweep = tmp_path / "sweep"
    assert main(["sweep", "--task", "cola", "--methods", ",".join(names), "--trials", "1", "--rank", "2",
                 "--data-dir", str(glue), "--output-dir", str(sweep), "--model", str(tiny_dir), "--train-limit", "32",
                 "--eval-limit", "16", "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--threads", "1",
                 "--report-to", "none"]) == 0
    for method in names:
        best = yaml.safe_load((sweep / f"best_{method}.yaml").read_text())
        assert best["method"] == method and best["lr"] > 0


# ---- refusals -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, refused", [(m, m in ("pissa", "olora", "loraga")) for m in FAMILY])
def test_a_quantized_backbone_is_refused_in_one_line_where_peft_cannot_build_it(method, refused):
    cls = methods.get(method)
    run = RunInfo(total_steps=10, seed=0, rank=RANK, adapter_params=0, targets=["query"], modules_to_save=[],
                  lora_alpha=None, lora_dropout=0.0, quantized=True)
    method_object = cls(cls.make_settings({}, run), run)
    if not refused:
        assert method_object.check() == []
        return
    with pytest.raises(UserError, match=rf"^--method {method} with --load-in-4bit: ") as e:
        method_object.check()
    assert "\n" not in str(e.value)


def test_olora_refuses_a_transposed_conv1d_layer_in_one_line():
    """PEFT's OLoRA builds a GPT-2 Conv1D adapter whose factors fail at the first forward pass: refused first."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=20,
                                                     pad_token_id=0))
    cls = methods.get("olora")
    run = RunInfo(total_steps=10, seed=0, rank=RANK, adapter_params=0, targets=["c_attn"], modules_to_save=["score"],
                  lora_alpha=None, lora_dropout=0.0)
    with pytest.raises(UserError, match=r"^--method olora: PEFT's OLoRA cannot initialise transformer\.h\.0\.attn"
                                        r"\.c_attn, a transposed Conv1D layer") as e:
        cls(cls.make_settings({}, run), run).build(model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method, setting, value, why", [
    ("eva", "rho", 0.5, "must be a number >= 1"), ("eva", "tau", 1.5, "must lie in [0, 1]"),
    ("eva", "batches", True, "must be an integer >= 1"), ("loraga", "stable_gamma", 0, "must be an integer >= 1"),
    ("loraga", "direction", "up", "use one of"), ("loraplus", "lr_ratio", float("nan"), "must be a positive number"),
    ("pissa", "niter", -1, "must be an integer >= 0")])
def test_bad_settings_are_refused_by_the_one_setting_error(method, setting, value, why):
    """Each refusal names the field and its value (the CLI turns it into the flag: `--eva-rho = 0.5: ...`)."""
    from fwlora.errors import MethodError
    from fwlora.methods import get

    with pytest.raises(MethodError, match=rf"\.{setting} = {re.escape(repr(value))}: {re.escape(why)}"):
        get(method).Settings(**{setting: value})
