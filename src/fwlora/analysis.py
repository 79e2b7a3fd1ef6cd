"""Per-matrix statistics of a trained adapter, and the numbers behind docs/method.md's open questions.
Pure functions of tensors and plain data, used by training (to record, on the main process only) and by the
report (to read)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch

from fwlora.lowrank import LowRank

_LAYER = re.compile(r"\.(\d+)\.")


def split_matrix_name(name: str) -> tuple[int | None, str]:
    """'bert.encoder.layer.3.attention.self.query' -> (3, 'attention.self.query')."""
    m = _LAYER.search(name)
    if not m:
        return None, name
    return int(m.group(1)), name[m.end():]


def singular_values(delta: LowRank | torch.Tensor) -> torch.Tensor:
    """dW's singular values, float64, largest first: from its factors where it has them (lowrank.py: the nonzero
    ones, at most the adapter's rank of them, without forming dW), else from the dense matrix."""
    if isinstance(delta, LowRank):
        return delta.singular_values()
    return torch.linalg.svdvals(delta.double())


def effective_rank(sv: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = sigma / sum sigma: 1 for a rank-1 update,
    r for r equal singular values, 0 for a zero update."""
    total = sv.sum()
    if total <= 0:
        return 0.0
    p = sv[sv > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(sv: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above max(shape) * eps(float32) * sigma_max (numpy's matrix_rank rule, float32)."""
    if sv.numel() == 0 or sv[0] <= 0:
        return 0
    tol = max(shape) * torch.finfo(torch.float32).eps * sv[0]
    return int((sv > tol).sum())


def matrix_table(
    deltas: dict[str, LowRank | torch.Tensor],
    keep_singular_values: int = 16,
    **columns: dict[str, float] | None,
) -> list[dict]:
    """One row per adapted matrix (dW dense or as its factors, models.delta_weights): ||dW||_F, effective and
    numerical rank, top singular values, and the method's own per-matrix columns (FW-LoRA's fisher and
    importance, AdaLoRA's adalora_rank, fwrank's fwrank_rank, ...): {column: {matrix name: value}}. A matrix a
    column has no value for gets None; a name in a column but not in deltas (fwrank dropped its adapter) gets a
    row of its own with rank 0."""
    rows = []
    for name, delta in deltas.items():
        sv = singular_values(delta)
        layer, kind = split_matrix_name(name)
        row = {
            "name": name, "layer": layer, "kind": kind, "shape": list(delta.shape),
            "fro_norm": float(sv.square().sum().sqrt()),
            "effective_rank": effective_rank(sv),
            "numerical_rank": numerical_rank(sv, tuple(delta.shape)),
            "singular_values": sv[:keep_singular_values].tolist(),
        }
        for key, values in columns.items():
            if values is not None:
                row[key] = values.get(name)
        rows.append(row)
    dropped = sorted({n for values in columns.values() if values for n in values} - set(deltas))
    for name in dropped:  # no adapter left: dW = 0
        layer, kind = split_matrix_name(name)
        row = {"name": name, "layer": layer, "kind": kind, "shape": None, "fro_norm": 0.0, "effective_rank": 0.0,
               "numerical_rank": 0, "singular_values": []}
        row.update({key: values.get(name) for key, values in columns.items() if values is not None})
        rows.append(row)
    return rows


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / quartiles / max / mean / std of a list of numbers."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if a.size == 0:
        return {}
    q = np.quantile(a, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"min": q[0], "q1": q[1], "median": q[2], "q3": q[3], "max": q[4], "mean": a.mean(), "std": a.std(),
            "n": int(a.size)}


def uniformity_of_weights(importance: Sequence[float]) -> dict[str, float]:
    """How far the penalty weights (1 - I_m) are from a uniform weight decay on dW.

    Returns the spread of (1 - I_m) and its relative range (max - min) / mean: 0 would be exactly a
    uniform decay; with M matrices and I summing to 1 the mean weight is 1 - 1/M.
    """
    w = [1.0 - i for i in importance]
    s = spread(w)
    if s:
        s["relative_range"] = (s["max"] - s["min"]) / s["mean"] if s["mean"] else float("nan")
    return s


def log_norm_shift(norms_a: Sequence[float], norms_b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of per-matrix ||dW|| between two runs (b vs a, matched by position):
    the mean and spread of log(b / a), and the Spearman correlation of the two orderings."""
    from scipy.stats import spearmanr

    a = np.asarray(norms_a, dtype=float)
    b = np.asarray(norms_b, dtype=float)
    ok = (a > 0) & (b > 0)
    ratio = np.log(b[ok] / a[ok])
    rho = spearmanr(a[ok], b[ok]).statistic if ok.sum() > 2 else float("nan")
    return {"mean_log_ratio": float(ratio.mean()) if ratio.size else float("nan"),
            "std_log_ratio": float(ratio.std()) if ratio.size else float("nan"),
            "geometric_mean_ratio": float(np.exp(ratio.mean())) if ratio.size else float("nan"),
            "spearman": float(rho), "n": int(ok.sum())}


# ---- the layer x matrix-type grid of the report's heatmaps (pure) --------------------------------------

# Matrix types in the order a reader expects them (attention, then feed-forward), per architecture family.
KNOWN_KIND_ORDERS: tuple[tuple[str, ...], ...] = (
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
     "intermediate.dense", "output.dense"),  # BERT, RoBERTa, MiniLM
    ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj", "attention.output.dense",
     "intermediate.dense", "output.dense"),  # DeBERTa-v2/v3
    ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "intermediate.dense",
     "output.dense"),  # MPNet
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
     "mlp.down_proj"),  # LLaMA, Qwen, Mistral, SmolLM
    ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),  # GPT-2
)
KIND_LABELS = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
               "attention.output.dense": "attn.out", "intermediate.dense": "ffn.in", "output.dense": "ffn.out",
               "attention.self.query_proj": "query", "attention.self.key_proj": "key",
               "attention.self.value_proj": "value", "attention.attn.q": "q", "attention.attn.k": "k",
               "attention.attn.v": "v", "attention.attn.o": "attn.out", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
               "self_attn.v_proj": "v", "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
               "mlp.down_proj": "down", "attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc",
               "mlp.c_proj": "mlp.c_proj"}
KIND_ORDER = KNOWN_KIND_ORDERS[0]  # BERT's six matrix types (release 1's name)


def _floats(values: Sequence[float | None]) -> np.ndarray:
    """A per-matrix column as float64, None -> NaN."""
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


def importance_shrink_correlation(importance: Sequence[float], norms_base: Sequence[float],
                                  norms_weighted: Sequence[float]) -> dict[str, float]:
    """Spearman correlation between I_m and ||dW_m|| (weighted run) / ||dW_m|| (base run), matched by
    position: positive when the penalty shrinks the low-importance matrices more than the important
    ones (the reallocation FW-LoRA claims), near 0 when it shrinks them all alike."""
    i, a, b = _floats(importance), _floats(norms_base), _floats(norms_weighted)
    ok = np.isfinite(i) & np.isfinite(a) & np.isfinite(b) & (a > 0) & (b > 0)
    ratio = np.full_like(a, np.nan)
    ratio[ok] = b[ok] / a[ok]
    return {"spearman": rank_correlation(i, ratio), "n": int(ok.sum())}


def share_by_kind(values: dict[str, float | None]) -> dict[str, float]:
    """{matrix name: non-negative value} -> {matrix type: share of the total}: which types of matrix a
    quantity (Fisher importance, squared update norm, adapter parameters) sits on. Missing values count 0."""
    totals: dict[str, float] = {}
    for name, v in values.items():
        kind = split_matrix_name(name)[1]
        totals[kind] = totals.get(kind, 0.0) + (v if v is not None and math.isfinite(v) else 0.0)
    whole = sum(totals.values())
    return {k: (t / whole if whole > 0 else float("nan")) for k, t in totals.items()}


def rank_correlation(a: Sequence[float | None], b: Sequence[float | None]) -> float:
    """Spearman's rho of two per-matrix columns matched by position (pairs with a missing value left
    out); NaN for fewer than 3 pairs or a constant column."""
    import warnings

    from scipy.stats import spearmanr

    x, y = _floats(a), _floats(b)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input gives NaN, which is the honest answer
        return float(spearmanr(x[ok], y[ok]).statistic)


def order_kinds(kinds: Sequence[str]) -> list[str]:
    """Kinds in the order of the known architecture that covers most of them, the others after them as
    first seen."""
    seen = list(dict.fromkeys(kinds))
    best = max(KNOWN_KIND_ORDERS, key=lambda order: sum(k in order for k in seen))
    known = [k for k in best if k in seen]
    return known + [k for k in seen if k not in known]


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def layer_kind_grid(values: dict[tuple[int | None, str], float]) -> tuple[list[int | None], list[str], np.ndarray]:
    """{(layer, kind): value} -> (layers, kinds, array[layer, kind]) with NaN where a matrix is absent;
    layers ascending (None last), kinds by order_kinds, so that heatmaps of different runs line up."""
    layers = sorted({k[0] for k in values}, key=lambda v: (v is None, v if v is not None else 0))
    kinds = order_kinds([k[1] for k in values])
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), v in values.items():
        if v is not None:
            grid[layers.index(layer), kinds.index(kind)] = v
    return layers, kinds, grid
