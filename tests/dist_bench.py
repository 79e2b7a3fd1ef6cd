"""Run by test_workers.py under torchrun: `fwlora bench <args>` in this process, recording what this rank
writes (run files, claims, cleared directories) and trains, and how many DDP wrappers are still in memory when the
process group is destroyed (one would keep the group's threads alive to the interpreter's exit), into
<writes>/rank<k>.json."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path


def main() -> int:
    writes, argv = Path(sys.argv[1]), sys.argv[2:]
    from fwlora import bench, claims, files, rundir
    from fwlora.cli.app import main as fwlora

    seen: dict[str, list[str]] = {"files": [], "claims": [], "cleared": [], "trained": []}

    def key(run_dir) -> str:
        return "/".join(Path(run_dir).parts[-4:])

    def spy(name, real, describe):
        def wrapped(*args, **kwargs):
            seen[name].append(describe(*args, **kwargs))
            return real(*args, **kwargs)
        return wrapped

    files.write_text_atomic = spy("files", files.write_text_atomic, lambda path, text: str(path))
    claims.Claims._create = staticmethod(spy("claims", claims.Claims._create, lambda path, holder: key(path.parent)))
    rundir._clear = spy("cleared", rundir._clear, key)
    bench.train = spy("trained", bench.train, lambda cfg, **kw: key(cfg.output_dir))
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    def ddp_in_memory(*args, **kwargs) -> int:  # garbage not yet collected counts: it still holds the group
        return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())

    seen["ddp_at_destroy"] = []
    dist.destroy_process_group = spy("ddp_at_destroy", dist.destroy_process_group, ddp_in_memory)
    code = fwlora(argv)
    writes.mkdir(parents=True, exist_ok=True)
    (writes / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
    return code


if __name__ == "__main__":
    from fwlora.files import leave_process

    leave_process(main())  # as the fwlora executable leaves
