"""A resize under DDP (two gloo processes, bf16 autocast): the old wrapper is released, the accelerator holds the
model once with its forward wrapped once, and the resized adapter's gradients are still averaged; the end-of-run
matrix table is rank 0's alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_distributed import base_config, sentence_data, tiny_model_dir

HERE = Path(__file__).resolve().parent


def test_a_resize_under_ddp_rewraps_once_and_still_averages_gradients(tmp_path):
    model, data = tiny_model_dir(tmp_path), sentence_data(tmp_path)
    # 4 steps an epoch, 2 epochs: fwrank resizes at step 3 (the re-wrap is the loop's, whichever method resized)
    config = base_config(model, data, method="fwrank", fwrank_warmup_steps=3, mixed_precision="bf16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(32700 + os.getpid() % 1000), str(HERE / "resize_worker.py"), str(tmp_path / "config.json"), str(out)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[max(done.stderr.find("Traceback"), 0):][:3000]  # the first traceback
    for k in (0, 1):
        info = json.loads((out / f"rank{k}.json").read_text())
        assert info["world"] == 2 and info["steps"] == 8
        assert info["new_wrapper"] == [True] and info["models_after"] == [1] and info["models_at_end"] == [True]
        assert info["forward_wrappers"][0] > 0 and info["forward_wrappers"][1] == info["forward_wrappers"][0]
        assert info["old_wrappers_alive"] == 0  # nothing holds the replaced DDP wrapper (nor its reducer)
        # the end-of-run matrix table (an SVD per matrix) is taken by the process that writes the record only
        assert (info["delta_weights_calls"], info["matrices"] > 0) == ((1, True) if k == 0 else (0, False))
    r0, r1 = (load_file(str(out / f"rank{k}.safetensors")) for k in (0, 1))
    assert r0.keys() == r1.keys()
    # each rank trains on its half of every batch: after 5 steps at the new shapes they agree exactly only if
    # DDP averaged the new parameters' gradients
    for key in r0:
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0)
    moved = [k for k in r0 if k.startswith("end/") and "lora_" in k and not torch.equal(r0[k], r0["resized/" + k[4:]])]
    assert moved  # and they did train after the resize
