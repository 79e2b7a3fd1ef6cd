"""FW-LoRA's settings. Defaults are the method's own (docs/method.md); the warm-up fields are shared with
fwrank (methods/gradients/: WarmupConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fwlora.checks import is_finite_real
from fwlora.methods.gradients import WarmupConfig


@dataclass(kw_only=True)
class FWLoRAConfig(WarmupConfig):
    """Settings of FW-LoRA: lambda, the estimator of the Fisher scores and the penalty's weights, plus the
    shared warm-up (K = warmup_steps, beta, sketch_size, measure_every, seed)."""

    lambda_fw: float = field(default=1e-4, metadata={"help": "weight lambda of the Fisher-weighted penalty"})
    estimator: Literal["exact", "sketch"] = field(default="sketch", metadata={
        "help": "'sketch' (default): an unbiased Gaussian sketch ||G Omega||^2 / p; 'exact': ||G||^2. With one warm-up "
                "step in 8 measured, the sketch keeps the whole run at ~1.01x LoRA and ranks the matrices as the "
                "exact statistic every step does (Spearman 0.996; results/overhead/README.md)"})
    normalization: Literal["sum", "max", "mean"] = field(default="sum", metadata={
        "help": "penalty weights: 'sum' (the method's): 1 - F_m / sum F; 'max': 1 - F_m / max F; "
                "'mean': (mean F / F_m)^gamma, a weight that spreads as widely as the scores do"})
    gamma: float = field(default=1.0, metadata={"help": "exponent of the 'mean' normalisation (0: uniform weights)"})

    def __post_init__(self) -> None:
        if not is_finite_real(self.lambda_fw) or self.lambda_fw < 0:
            raise self.bad("lambda_fw", "must be a finite number >= 0")
        super().__post_init__()
        if self.estimator not in ("exact", "sketch"):
            raise self.bad("estimator", "must be 'exact' or 'sketch'")
        if self.sketch_size < 1:
            raise self.bad("sketch_size", "must be an integer >= 1 (estimator='exact' measures G itself)")
        if self.normalization not in ("sum", "max", "mean"):
            raise self.bad("normalization", "must be 'sum', 'max' or 'mean'")
        if not is_finite_real(self.gamma) or self.gamma < 0:
            raise self.bad("gamma", "must be a finite number >= 0")
