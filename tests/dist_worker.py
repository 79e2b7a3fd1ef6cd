"""Run by test_distributed.py, under torchrun (N processes) or plain python (1 process): trains with the
engine's Trainer and dumps this rank's Fisher scores, importance and adapter to <out>/rank<k>.safetensors."""

from __future__ import annotations

import json
import sys
from pathlib import Path



def main() -> None:
    config_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    from safetensors.torch import save_file

    from fwlora.config import TrainConfig
    from fwlora.train import setup
    from fwlora.trainer import StopSignals as _StopSignals, Trainer

    cfg = TrainConfig.from_dict(json.loads(config_path.read_text()))
    s = setup(cfg)
    out.mkdir(parents=True, exist_ok=True)
    t = Trainer(s, out / "run")
    with _StopSignals() as stop:
        t.fit(stop)
    rank = t.accelerator.process_index
    tensors = {f"adapter/{n}": p.detach().cpu().contiguous() for n, p in t.unwrapped.named_parameters() if p.requires_grad}
    fw = getattr(t.method, "fw", None)  # FW-LoRA's library object inside its plug-in
    if fw is not None:
        tensors["fisher"] = fw._fisher.cpu()
        tensors["importance"] = fw._importance.cpu()
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"world": t.accelerator.num_processes, "history": t.history,
                                                       "steps": t.global_step}))


if __name__ == "__main__":
    main()
