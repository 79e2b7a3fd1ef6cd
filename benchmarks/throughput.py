"""How close a training step runs to the machine's limit: tokens per second, the step's floating-point work
counted by torch (FlopCounterMode over forward and backward), and that work per second against the cores'
peak. Shared by overhead.py, precision.py and gpu_check.py.

Peak, on a CPU: cores x clock x FLOPs per cycle per core. FLOPs per cycle: 2 FMA pipes x 8 float32 lanes (256
bit) x 2 = 32 for float32 on AVX2 and on AVX-512 machines that split 512-bit work into two 256-bit halves
(AMD Zen 4, this machine's EPYC); twice that for bfloat16 where the CPU has AVX512_BF16 (VDPBF16PS). The clock
is /proc/cpuinfo's; boost clocks make the true peak somewhat higher, so the fraction is an upper bound.
On a GPU: the card's dense datasheet peak for the precision (GPU_PEAK_TFLOPS, by torch.cuda.get_device_name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch


def step_flops(model: Any, batch: dict[str, torch.Tensor], autocast: torch.dtype | None = None) -> int:
    """FLOPs of one forward + backward pass on `batch` (matmuls and convolutions, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def cpu_peak_gflops(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The cores' peak in GFLOP/s for float32 (or bfloat16), with what it assumes."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", text)]
    flags = set((re.search(r"flags\s*:\s*(.*)", text) or [None, ""])[1].split())
    cores = torch.get_num_threads() or os.cpu_count() or 1
    per_cycle = 32 if {"fma", "avx2"} <= flags or "avx512f" in flags else 16
    if dtype == torch.bfloat16 and "avx512_bf16" in flags:
        per_cycle *= 2
    ghz = (max(mhz) if mhz else 2000.0) / 1000
    return {"gflops": cores * ghz * per_cycle, "cores": cores, "ghz": ghz, "flops_per_cycle_per_core": per_cycle,
            "dtype": str(dtype).removeprefix("torch."),
            "assumes": f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle ({'avx512_bf16' if per_cycle == 64 else 'fma'})"}


def throughput(seconds: float, tokens: int, padded_tokens: int, flops: int, peak: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s (real and padded), GFLOP/s and the share of the peak, for one step's measured time."""
    achieved = flops / seconds / 1e9
    return {"tokens_per_second": tokens / seconds, "padded_tokens_per_second": padded_tokens / seconds,
            "gflop_per_step": flops / 1e9, "achieved_gflops": achieved, "peak_gflops": peak["gflops"],
            "fraction_of_peak": achieved / peak["gflops"], "peak_assumes": peak["assumes"]}


# Dense (no sparsity) peaks in TFLOP/s from NVIDIA's datasheets, matched in this order against
# torch.cuda.get_device_name (so "H200 NVL" before "H200", "L40S" before "L4", "A100" before "A10"):
# (name contains, bf16, fp16, tf32, fp32). None: not on this card, or not known here (pass the peak by hand).
GPU_PEAK_TFLOPS = (
    ("H200 NVL", 835, 835, 418, 60), ("H200", 989, 989, 495, 67),  # GH200's GPU matches H200's SXM peaks
    ("H100 NVL", 835, 835, 418, 60), ("H100 PCIe", 756, 756, 378, 51), ("H100", 989, 989, 495, 67),
    ("A100", 312, 312, 156, 19.5), ("A10G", None, None, None, None), ("A10", 125, 125, 62.5, 31.2),
    ("L40S", 362, 362, 183, 91.6), ("L40", 181, 181, 90.5, 90.5), ("L4", 121, 121, 60, 30.3),
    ("V100", None, 125, None, 15.7), ("T4", None, 65, None, 8.1),
)
GPU_PRECISIONS = ("bf16", "fp16", "tf32", "fp32")


def gpu_peak_tflops(device_name: str, precision: str) -> dict[str, Any] | None:
    """The card's dense peak for bf16 / fp16 / tf32 / fp32 matmuls, with what it assumes; None when unknown."""
    for name, *peaks in GPU_PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            value = dict(zip(GPU_PRECISIONS, peaks))[precision]
            if value is None:
                return None
            return {"tflops": float(value), "assumes": f"{name} datasheet, {precision} dense (no sparsity)"}
    return None
