"""Use what you trained: `load_run(run_dir)` rebuilds a finished run's model for inference (the right backbone
and head, the adapter with fwrank's ranks, the tokenizer, the label names), `predict` runs it over examples,
and `export_run` writes the adapter alone (standard PEFT) or a merged standalone model.

    from fwlora import load_run
    run = load_run("runs/cola-fwrank")
    rows = predict(run, ["The cat sat on the mat.", "Mat the on sat cat."])   # [{"label": ..., "probabilities": ...}]

The run's method state (FW-LoRA's scores, fwrank's allocation) loads beside it with for_training=True, when
training is to go on.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fwlora import methods, models
from fwlora.config import TrainConfig
from fwlora.errors import UserError
from fwlora.plan import resolve_head
from fwlora.records import ADAPTER_DIR, Status, read_config, read_result

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.safetensors"


@dataclass
class LoadedRun:
    """A finished run, ready for inference."""

    run_dir: Path
    config: TrainConfig
    model: torch.nn.Module  # a PeftModel over the backbone and its head, in eval mode
    tokenizer: Any
    kind: str  # "classification", "regression" or "causal-lm"
    label_names: list[str] | None  # class names in label order (None: the labels are 0..n-1, or no classes)
    head: str  # "mean" or "model"
    record: Any  # its RunRecord
    method_state: Any = None  # the method's Method.continued_state, when loaded for training

    def label_of(self, index: int) -> str | int:
        return self.label_names[index] if self.label_names else index


def _kind_and_labels(cfg: TrainConfig, record: Any) -> tuple[str, int | None, list[str] | None]:
    data = record.data or {}
    model_kind, num_labels, names = data.get("model_kind"), data.get("num_labels"), data.get("label_names")
    if model_kind is None:  # a record from before release 3: ask the task
        from fwlora.tasks import task_for

        task = task_for(cfg)
        model_kind, num_labels, names = task.model_kind, task.num_labels, getattr(task, "label_names", None)
    if model_kind == models.CAUSAL_LM:
        return "causal-lm", None, None
    return ("regression" if num_labels == 1 else "classification"), num_labels, names


def resolve_device(choice: str | torch.device) -> torch.device:
    """"auto": the first CUDA device when there is one, else the CPU; "cpu", "cuda", "cuda:N" as they say
    (a CUDA device that is not there is the user's mistake, said in one line)."""
    if isinstance(choice, torch.device):
        return choice
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise UserError(f"--device {choice!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {choice}: torch sees no CUDA device here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {choice}: there are {torch.cuda.device_count()} CUDA devices (0..)")
    elif device.type != "cpu":
        raise UserError(f"--device {choice!r}: use auto, cpu, cuda or cuda:N")
    return device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A host batch on `device`; to a GPU through pinned memory, without waiting for the copy."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def load_run(run_dir: str | Path, device: str | torch.device | None = None, for_training: bool = False) -> LoadedRun:
    """The trained model of a complete run directory (written by `fwlora train` or `bench`), in the run's
    dtype, on `device` ("auto", "cpu", "cuda[:N]"; None: where it loads, the CPU)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    record = read_result(run_dir)
    if config is None:
        raise UserError(f"{run_dir} holds no fwlora run (no config.json)")
    if record is None or record.status != Status.COMPLETE:
        status = record.status if record is not None else "unfinished (no result.json)"
        raise UserError(f"{run_dir}: the run did not complete ({status}); finish it with `fwlora train --resume "
                        f"--output-dir {run_dir} ...` or train it again")
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no adapter (adapter_config.json) in this complete run; was it copied without it?")
    cfg = TrainConfig.from_dict(config, source=str(run_dir / "config.json"))
    kind, num_labels, names = _kind_and_labels(cfg, record)
    head = record.budget.head or resolve_head(cfg)
    model_kind = models.CAUSAL_LM if kind == "causal-lm" else models.SEQUENCE_CLASSIFICATION
    base, tokenizer = models.load_backbone(cfg.model, num_labels, head, kind=model_kind, dtype=cfg.dtype)
    if (adapter / "tokenizer_config.json").is_file():  # the tokenizer the run trained with (its pad token set)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        models.set_pad_token(base, tokenizer, cfg.model)
    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=for_training)
    if device is not None:
        model.to(resolve_device(device))
    model.train(for_training)
    run = LoadedRun(run_dir, cfg, model, tokenizer, kind, names, head, record)
    if for_training:
        run.method_state = methods.get(cfg.method).continued_state(model, adapter)
    return run


# ---- predictions -------------------------------------------------------------------------------------------

def _batches(n: int, lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in length order (longest first), cut into batches: little padding, same results."""
    order = sorted(range(n), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def predict(run: LoadedRun, inputs: Sequence[Any], batch_size: int = 64, max_length: int | None = None,
            max_new_tokens: int = 256, progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """One row per input, in input order. Classification and regression: an input is a text or a tuple of two
    (a pair); the row holds the label (and the probability of each class) or the value. Causal LM: an input is
    a prompt; the row holds the greedy response."""
    if run.kind == "causal-lm":
        return _generate(run, inputs, batch_size, max_length, max_new_tokens, progress)
    from transformers import DataCollatorWithPadding

    from fwlora.tasks.glue import Example, encode

    texts = [tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in inputs]
    if len({len(t) for t in texts}) > 1:
        raise UserError("give every input the same number of texts (one, or two for pairs)")
    encoded = encode([Example(t, 0) for t in texts], run.tokenizer, max_length or run.config.max_length)
    for item in encoded:
        item.pop("labels")
    collate = DataCollatorWithPadding(run.tokenizer)
    device = next(run.model.parameters()).device
    out: list[dict[str, Any] | None] = [None] * len(encoded)
    for batch_ids in _batches(len(encoded), [len(e["input_ids"]) for e in encoded], batch_size):
        batch = to_device(dict(collate([encoded[i] for i in batch_ids])), device)
        logits = run.model(**batch).logits.float().cpu()  # waits for the GPU
        for i, z in zip(batch_ids, logits):
            if run.kind == "regression":
                out[i] = {"value": float(z.reshape(-1)[0])}
            else:
                probs = torch.softmax(z, -1)
                k = int(z.argmax())
                out[i] = {"label": run.label_of(k), "label_index": k,
                          "probabilities": {str(run.label_of(j)): float(p) for j, p in enumerate(probs)}}
        if progress is not None:
            progress(len(batch_ids))
    return out  # type: ignore[return-value]


def _generate(run: LoadedRun, prompts: Sequence[Any], batch_size: int, max_length: int | None,
              max_new_tokens: int, progress: Callable[[int], None] | None) -> list[dict[str, Any]]:
    from transformers import GenerationConfig

    from fwlora.tasks.instruct import InstructExample, build_prompt

    tok = run.tokenizer
    texts = []
    for p in prompts:
        prompt, _, chat = build_prompt(InstructExample(str(p), "", ""), tok)
        texts.append((prompt, chat))
    ids = [list(tok(t, add_special_tokens=not chat)["input_ids"])[-(max_length or run.config.max_length):]
           for t, chat in texts]
    device = next(run.model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out: list[dict[str, Any] | None] = [None] * len(ids)
    for batch_ids in _batches(len(ids), [len(x) for x in ids], batch_size):
        width = max(len(ids[i]) for i in batch_ids)
        input_ids = torch.full((len(batch_ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch_ids):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        generated = run.model.generate(**to_device({"input_ids": input_ids, "attention_mask": mask}, device),
                                       generation_config=config).cpu()
        for row, i in enumerate(batch_ids):
            out[i] = {"response": tok.decode(generated[row, width:].tolist(), skip_special_tokens=True)}
        if progress is not None:
            progress(len(batch_ids))
    return out  # type: ignore[return-value]


# ---- export ------------------------------------------------------------------------------------------------

def export_run(run_dir: str | Path, out: str | Path, merged: bool = False) -> Path:
    """Write the run's adapter alone (a standard PEFT adapter, with the tokenizer), or with merged=True a
    standalone model: the adapter merged into the backbone (PEFT's merge_and_unload). A model with the
    architecture's own head loads with transformers alone; a mean-pooling head is written as a
    sentence-transformers model (Transformer + mean Pooling) plus classifier.safetensors (the README's five-line loader)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new directory for the export")
    run = load_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"run": str(run_dir), "model": run.config.model, "method": run.config.method, "task": run.config.task,
            "kind": run.kind, "head": run.head, "label_names": run.label_names, "merged": merged}
    if not merged:
        for f in (run_dir / ADAPTER_DIR).iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        (out / "fwlora_export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return out
    model = run.model.merge_and_unload()
    if run.head == "mean" and isinstance(model, models.MeanPoolClassifier):
        _save_mean_pool(model, run, out)
    else:
        if run.label_names and hasattr(model.config, "id2label"):
            model.config.id2label = {i: n for i, n in enumerate(run.label_names)}
            model.config.label2id = {n: i for i, n in enumerate(run.label_names)}
        model.save_pretrained(str(out))
        run.tokenizer.save_pretrained(str(out))
    (out / "fwlora_export.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def _save_mean_pool(model: models.MeanPoolClassifier, run: LoadedRun, out: Path) -> None:
    """A sentence-transformers directory (the merged encoder, mean pooling, no normalisation) and the head."""
    from safetensors.torch import save_file

    model.encoder.save_pretrained(str(out))
    run.tokenizer.save_pretrained(str(out))
    dim = int(model.encoder.config.hidden_size)
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2), encoding="utf-8")
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], indent=2),
        encoding="utf-8")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": run.config.max_length,
                                                              "do_lower_case": False}), encoding="utf-8")
    head = model.classifier
    save_file({"weight": head.weight.detach().float().contiguous(), "bias": head.bias.detach().float().contiguous()},
              str(out / CLASSIFIER_FILE), {"label_names": json.dumps(run.label_names), "kind": run.kind})


# ---- what `fwlora predict` reads and writes ------------------------------------------------------------------

def prediction_inputs(run: LoadedRun, dataset: str | None = None, text_columns: str | None = None,
                      prompt_column: str | None = None, label_column: str | None = None
                      ) -> tuple[list[Any], list[Any] | None, str]:
    """(inputs, labels or None, where they came from): a file's rows, or the run's own evaluation data."""
    cfg = run.config
    if dataset is None:
        from fwlora.tasks import task_for

        task = task_for(cfg)
        _, examples, source = task.load(cfg.data_dir)
        if cfg.eval_limit:
            examples = examples[: cfg.eval_limit]
        if run.kind == "causal-lm":
            from fwlora.tasks.instruct import user_message

            return [user_message(e) for e in examples if hasattr(e, "instruction")], None, f"{source} (evaluation)"
        return [e.texts for e in examples], [e.label for e in examples], f"{source} (evaluation)"
    from fwlora.tasks.files import guess_text_columns, read_file

    table = read_file(Path(dataset).expanduser())
    if run.kind == "causal-lm":
        column = prompt_column or cfg.prompt_column or "prompt"
        if column not in table.columns:
            raise UserError(f"{dataset}: no column {column!r} (--prompt-column); its columns are {', '.join(table.columns)}")
        return [str(r[column]) for r in table.rows], None, dataset
    columns = tuple(c.strip() for c in text_columns.split(",")) if text_columns else (
        tuple(cfg.text_columns) if cfg.text_columns else guess_text_columns(table, cfg.label_column or "label"))
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{dataset}: no column {missing[0]!r} (--text-columns); its columns are {', '.join(table.columns)}")
    inputs = []
    for i, row in enumerate(table.rows):
        texts = tuple(row.get(c) for c in columns)
        if any(t is None or (isinstance(t, str) and not t.strip()) for t in texts):
            raise UserError(f"{table.where(i)}: an empty text in {', '.join(columns)}")
        inputs.append(tuple(str(t) for t in texts))
    label = label_column or cfg.label_column or "label"
    if label not in table.columns:
        return inputs, None, dataset
    labels = []
    for i, row in enumerate(table.rows):
        value = row.get(label)
        if run.kind == "regression":
            labels.append(float(value))
        elif run.label_names:
            if str(value) not in run.label_names:
                raise UserError(f"{table.where(i)}: label {value!r} is not a class the run was trained on "
                                f"({', '.join(run.label_names[:20])})")
            labels.append(run.label_names.index(str(value)))
        else:
            labels.append(int(value))
    return inputs, labels, dataset


def prediction_table(run: LoadedRun, inputs: Sequence[Any], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows for a CSV: the input text(s), then the prediction (label and probabilities, value, response)."""
    table = []
    for x, r in zip(inputs, rows):
        if run.kind == "causal-lm":
            table.append({"prompt": x, "response": r["response"]})
            continue
        texts = x if isinstance(x, (tuple, list)) else (x,)
        out = {"text": texts[0]} if len(texts) == 1 else {f"text{k + 1}": t for k, t in enumerate(texts)}
        if run.kind == "regression":
            out["value"] = r["value"]
        else:
            out["label"] = r["label"]
            out.update({f"p_{name}": p for name, p in r["probabilities"].items()})
        table.append(out)
    return table


def score(run: LoadedRun, rows: Sequence[dict[str, Any]], labels: Sequence[Any]) -> dict[str, float]:
    """The run's metrics on predictions with known labels (what its evaluation computed on the same examples)."""
    import numpy as np

    if run.kind == "regression":
        from fwlora.tasks.files import regression_metrics

        return regression_metrics(np.array(labels), np.array([r["value"] for r in rows]))
    from fwlora.tasks.glue import classification_metrics

    preds = np.array([r["label_index"] for r in rows])
    y = np.array(labels)
    if run.config.dataset:
        from fwlora.tasks.files import labelled_metrics

        return labelled_metrics(y, preds, len(run.label_names or []) or int(max(y.max(), preds.max())) + 1)
    from fwlora.tasks.glue import TASKS

    spec = TASKS.get(run.config.task)
    return classification_metrics(y, preds, pair=bool(spec and spec.is_pair))
