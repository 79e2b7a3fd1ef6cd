"""A few training steps of any registered method on any device and precision, driven through the method's hooks
in the training loop's order (fwlora/trainer.py), for benchmarks/gpu_check.py: the float64 reference and
the device run it is compared with, and the probes that time a step, its peak memory and a resize.

Per step, as the loop does: forward under autocast (Accelerate's mixed precision: float32 weights), the method's
extra loss, backward (scaled under fp16), unscale, clip, before_optimizer_step(step, scale), AdamW's step
(through the GradScaler under fp16), after_optimizer_step -> refresh_optimizer when the adapter changed, zero_grad.
The learning rate is constant: the schedule is not what is checked.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fwlora import methods, models
from fwlora.methods import base as method_base
from fwlora.methods.base import RunInfo, short_name

# the tiny random backbone of the correctness check (and of --device cpu's probes): 2 BERT layers, no dropout
TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_backbone() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_labels=2, **TINY))


@dataclass(frozen=True)
class Precision:
    """How a run computes: its weights' dtype, its autocast dtype, a gradient scaler, TF32 matmuls."""

    name: str
    weights: torch.dtype = torch.float32
    autocast: torch.dtype | None = None
    scaler: bool = False
    tf32: bool = False


PRECISIONS = {p.name: p for p in (Precision("fp64", torch.float64), Precision("fp32"), Precision("tf32", tf32=True),
                                  Precision("bf16", autocast=torch.bfloat16),
                                  Precision("fp16", autocast=torch.float16, scaler=True))}


def short_run_settings(cls: type, fraction: float = 0.5) -> dict[str, Any]:
    """A warm-up given in optimizer steps (FW-LoRA's and fwrank's K = 500) outlasts a short run: half the run."""
    defaults = cls.defaults()
    return {cls.flat_name(f.name): fraction for f in cls.setting_fields()
            if f.name == "warmup_steps" and isinstance(defaults[cls.flat_name(f.name)], int)}


def exact_statistic(cls: type) -> dict[str, Any]:
    """The sketch draws its Gaussian matrix from the device's own generator (CUDA's stream is not the CPU's), so
    a device run and the CPU reference would measure different sketches: compare the exact statistic, measured
    every warm-up step (both code paths of the statistic, CPU and device, are still the ones under test)."""
    names = {f.name for f in cls.setting_fields()}
    out: dict[str, Any] = {}
    if "estimator" in names:
        out[cls.flat_name("estimator")] = "exact"
    elif "sketch_size" in names:
        out[cls.flat_name("sketch_size")] = 0
    if "measure_every" in names:
        out[cls.flat_name("measure_every")] = 1
    return out


def synthetic_batches(n: int, batch_size: int, length: int, vocab: int, seed: int, padded: bool) -> list[dict]:
    """Random token ids and labels from a CPU generator (the same batches on every device); `padded`: each
    sequence gets a random length, so masking and padding are exercised."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (batch_size, length), generator=gen)
        mask = torch.ones(batch_size, length, dtype=torch.long)
        if padded:
            for i, keep in enumerate(torch.randint(max(2, length // 3), length + 1, (batch_size,), generator=gen)):
                mask[i, keep:] = 0
                ids[i, keep:] = 0
        labels = torch.randint(0, 2, (batch_size,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def build(method: str, backbone: Callable[[], nn.Module], rank: int, total_steps: int, seed: int,
          settings: dict[str, Any], batches: list[dict]) -> tuple[nn.Module, Any]:
    """(PEFT model on the CPU in float32, method object), as train.setup builds them: same seed, same start."""
    from transformers import set_seed

    set_seed(seed)
    model = backbone()
    targets = models.resolve_targets(model)
    counts = models.count_params(model, targets)
    run = RunInfo(total_steps=total_steps, seed=seed, rank=rank, adapter_params=counts.per_rank * rank,
                  targets=targets, modules_to_save=models.head_modules(model), lora_alpha=None, lora_dropout=0.0)
    cls = methods.get(method)
    instance = cls(cls.make_settings(settings, run), run)
    instance.check()
    data_pass = getattr(method_base, "DataPass", None)  # methods that read training data while they build
    if getattr(cls, "uses_data_pass", False) and data_pass is not None:
        instance.data = data_pass(batches=lambda n: iter(batches[:n]), loss=lambda m, b: m(**b).loss)
    return instance.build(model), instance


class tf32_matmuls:
    """TF32 for float32 matmuls inside the block (a no-op on the CPU); the previous setting comes back after."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.enabled else "highest")

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.previous)


class StepLoop:
    """One optimizer step at a time, the training loop's hook order; times each step and the method's
    after-step hook (a resize) with the device synchronised."""

    def __init__(self, model: nn.Module, method: Any, precision: Precision, device: torch.device, lr: float,
                 max_grad_norm: float = 1.0):
        self.model = model.to(device=device, dtype=precision.weights)
        self.method, self.precision, self.device, self.max_grad_norm = method, precision, device, max_grad_norm
        self.model.train()
        method.attach(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
        self.index = 0
        self.skipped: list[int] = []  # steps the gradient scaler skipped (inf/NaN gradients)
        self.changed: list[int] = []  # steps after which the method changed the trainable parameters
        self.step_seconds: list[float] = []
        self.hook_seconds: list[float] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        p = self.precision
        self.sync()
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=p.autocast, enabled=p.autocast is not None):
            loss = self.model(**batch).loss
        extra = self.method.extra_loss()  # outside autocast, as Accelerate wraps only the forward
        total = loss + extra if extra is not None else loss
        (self.scaler.scale(total) if self.scaler else total).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        scale = self.scaler.get_scale() if self.scaler else None
        self.method.before_optimizer_step(self.index, scale)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale:
                self.skipped.append(self.index)
        else:
            self.optimizer.step()
        self.sync()
        hook_start = time.perf_counter()
        if self.method.after_optimizer_step(self.index):
            self.method.refresh_optimizer(self.optimizer)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.changed.append(self.index)
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        end = time.perf_counter()
        self.hook_seconds.append(end - hook_start)
        self.step_seconds.append(end - start)
        self.index += 1
        return loss.detach()


# ---- correctness: a trajectory and its comparison with the reference --------------------------------------------

@dataclass(frozen=True)
class CheckSpec:
    """The correctness run: tiny backbone, a few steps with the warm-up (and any resize) inside them."""

    steps: int = 8
    batch_size: int = 8
    length: int = 12
    rank: int = 2
    lr: float = 1e-2
    seed: int = 0


@dataclass
class Trajectory:
    losses: list[float]
    start: dict[str, torch.Tensor]  # float64 on the CPU: dW of each adapted matrix, then the head's parameters
    end: dict[str, torch.Tensor]
    ranks: dict[str, int]
    skipped: list[int]
    changed: list[int]
    initial: dict[str, torch.Tensor]  # the trainable parameters as the run starts (exactly the reference's)


def adapter_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """dW = s B A of every adapted matrix (whatever its rank) and the trainable non-adapter parameters (the
    head), float64 on the CPU; and each matrix's rank."""
    out, ranks = {}, {}
    with torch.no_grad():
        for name, layer in models.adapted_layers(model).items():
            adapter = layer.active_adapters[0]
            out[f"dW {short_name(name)}"] = layer.get_delta_weight(adapter).detach().double().cpu()
            ranks[short_name(name)] = int(layer.r[adapter])
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                out[short_name(name)] = p.detach().double().cpu().clone()  # not an alias in float64
    return out, ranks


def check_batches(spec: CheckSpec) -> list[dict]:
    return synthetic_batches(spec.steps, spec.batch_size, spec.length, TINY["vocab_size"], spec.seed + 1, padded=True)


def trajectory(method: str, precision: Precision, device: torch.device, spec: CheckSpec) -> Trajectory:
    cls = methods.get(method)
    settings = {**short_run_settings(cls), **exact_statistic(cls)}
    batches = check_batches(spec)
    model, instance = build(method, tiny_backbone, spec.rank, spec.steps, spec.seed, settings, batches)
    with tf32_matmuls(precision.tf32):
        loop = StepLoop(model, instance, precision, device, spec.lr)
        start, _ = adapter_weights(loop.model)
        initial = {n: p.detach().double().cpu().clone() for n, p in loop.model.named_parameters() if p.requires_grad}
        losses = torch.stack([loop.step(b).double() for b in batches]).cpu().tolist()
    end, ranks = adapter_weights(loop.model)
    instance.close()
    return Trajectory(losses, start, end, ranks, loop.skipped, loop.changed, initial)


@dataclass(frozen=True)
class Tolerance:
    loss_rel: float  # max over steps of |loss - reference| / |reference|
    weight_rel: float  # ||w - w_ref|| / ||w_ref - w_start|| over dW and the head: relative to what training changed


# Adam divides by sqrt(v): a gradient error of relative size e moves each update by about e, so the weights'
# error is about the gradients', largest where a gradient is near zero (a direction the loss hardly sees): the
# loss is the sharper test. Largest on the CPU over 7 methods (2-layer BERT, 8 steps), loss / weights: fp32
# 1.6e-7 / 1.2e-5, bf16 7.8e-4 / 6.3e-2, fp16 1.0e-4 / 6.9e-3; the bounds are 5-60x those. TF32 (10 mantissa bits,
# float32's range) is held to about fp16's. A learning rate 5 % off moves the loss by 3e-2, the weights by 0.06-0.2.
TOLERANCES = {"fp32": Tolerance(1e-5, 1e-3), "tf32": Tolerance(2e-3, 0.1), "bf16": Tolerance(1e-2, 0.3),
              "fp16": Tolerance(2e-3, 0.05)}


def compare(run: Trajectory, reference: Trajectory, tolerance: Tolerance) -> dict[str, Any]:
    problems = []
    if run.skipped:
        problems.append(f"the gradient scaler skipped steps {run.skipped} (inf/NaN gradients)")
    if run.changed != reference.changed:
        problems.append(f"the adapter changed after steps {run.changed}, the reference's after {reference.changed}")
    if run.ranks != reference.ranks:
        differ = {k: (v, reference.ranks.get(k)) for k, v in run.ranks.items() if reference.ranks.get(k) != v}
        problems.append(f"ranks differ from the reference's (matrix: (run, reference)): {differ}")
    if run.initial.keys() != reference.initial.keys() or any(
            not torch.equal(run.initial[k], reference.initial[k]) for k in reference.initial):
        problems.append("the runs did not start from the same weights")
    if not all(math.isfinite(x) for x in run.losses):
        problems.append("a loss is not finite")
    loss_abs = [abs(a - b) for a, b in zip(run.losses, reference.losses)]
    loss_rel = [d / max(abs(b), 1e-12) for d, b in zip(loss_abs, reference.losses)]
    diff2 = update2 = 0.0
    weight_abs = 0.0
    for key, ref in reference.end.items():
        got = run.end.get(key)
        if got is None or got.shape != ref.shape:
            problems.append(f"{key}: shape {None if got is None else tuple(got.shape)}, reference {tuple(ref.shape)}")
            continue
        d = got - ref
        diff2 += float(d.square().sum())
        update2 += float((ref - reference.start[key]).square().sum())
        weight_abs = max(weight_abs, float(d.abs().max()))
    weight_rel = math.sqrt(diff2 / update2) if update2 > 0 else float("inf")
    if not math.isfinite(weight_rel):
        problems.append("the weights' difference is not finite (or the reference did not move)")
    values = {"loss_max_abs": max(loss_abs), "loss_max_rel": max(loss_rel), "weight_max_abs": weight_abs,
              "weight_rel": weight_rel}
    passed = not problems and values["loss_max_rel"] <= tolerance.loss_rel and weight_rel <= tolerance.weight_rel
    return {"passed": passed, **values, "tolerance": {"loss_max_rel": tolerance.loss_rel,
                                                       "weight_rel": tolerance.weight_rel},
            "problems": problems, "losses": run.losses, "reference_losses": reference.losses,
            "resized_after_steps": run.changed}


def describe(result: dict[str, Any]) -> str:
    """One line for a compare() result (or an error)."""
    if "error" in result:
        return result["error"]
    tol = result["tolerance"]
    return (f"loss rel {result['loss_max_rel']:.1e} (<= {tol['loss_max_rel']:g}), weights rel "
            f"{result['weight_rel']:.1e} (<= {tol['weight_rel']:g})" + "".join(f"; {p}" for p in result["problems"]))


# ---- probes: step time, peak memory, FLOPs, a resize ---------------------------------------------------------

@dataclass
class Probe:
    """A short run of one method on the real backbone: what memory, mfu and resize read."""

    method: str
    precision: str
    step_seconds: list[float]
    hook_seconds: list[float]
    changed: list[int]
    skip: int  # first steps left out of the medians (allocations, kernel selection)
    peak_memory: dict[str, Any]
    tokens_per_step: int
    counted_flops_per_step: int  # FlopCounterMode over forward + backward of the adapted model, before attach
    linear_params: int  # weights of every nn.Linear: the matmul work of the 6N estimate
    trainable_params: int
    layers: int | None
    hidden: int | None
    length: int

    def normal_step_seconds(self) -> float:
        rest = [t for i, t in enumerate(self.step_seconds) if i >= self.skip and i not in self.changed]
        return statistics.median(rest)


def counted_flops(model: nn.Module, batch: dict, precision: Precision, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=precision.autocast, enabled=precision.autocast is not None):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def probe(method: str, precision: Precision, device: torch.device, backbone: Callable[[], nn.Module],
          steps: int, batch_size: int, length: int, rank: int, lr: float, skip: int = 3) -> Probe:
    cls = methods.get(method)
    config = backbone().config
    batches = synthetic_batches(steps, batch_size, length, config.vocab_size, seed=1, padded=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, instance = build(method, backbone, rank, steps, 0, short_run_settings(cls), batches)
    # PEFT keeps the head's original next to its trained copy (modules_to_save): only the copy computes
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and "original_module" not in name)
    with tf32_matmuls(precision.tf32):
        model = model.to(device=device, dtype=precision.weights)
        flops = counted_flops(model, {k: v.to(device) for k, v in batches[0].items()}, precision, device)
        loop = StepLoop(model, instance, precision, device, lr)
        for b in batches:
            loop.step(b)
    if device.type == "cuda":
        peak = {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device)}
    else:
        import resource

        peak = {"kind": "process_peak_rss (the CPU has no per-run counter: the process's peak so far)",
                "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    result = Probe(method, precision.name, loop.step_seconds, loop.hook_seconds, loop.changed, min(skip, steps - 1),
                   peak, batch_size * length, flops, linear, sum(p.numel() for p in loop.params),
                   getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None), length)
    instance.close()
    del loop, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def flop_estimates(p: Probe) -> dict[str, Any]:
    """FLOPs per step by formula, over the padded tokens. 6N: forward 2N + backward 4N per token (activation and
    weight gradients), the usual MFU convention, plus the attention scores' 12 L s d (PaLM, appendix B). With a
    frozen backbone the backward still runs through every layer's activations (2N) but skips the frozen weights'
    gradients: 4N + 2 N_trainable + 12 L s d is the work needed. Both count the head as if on every token."""
    attention = 12 * p.layers * p.length * p.hidden if p.layers and p.hidden else 0
    return {"six_n": (6 * p.linear_params + attention) * p.tokens_per_step,
            "frozen_backbone": (4 * p.linear_params + 2 * p.trainable_params + attention) * p.tokens_per_step,
            "estimate": "6N: (6 N + 12 L s d) x tokens; frozen_backbone: (4 N + 2 N_trainable + 12 L s d) x tokens; "
                        "N = weights of every nn.Linear that computes (embeddings are lookups), "
                        "tokens = batch x length"}
