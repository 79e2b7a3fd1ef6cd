"""Which bench worker trains which run of a shared output directory.

Several `fwlora bench` processes may work on one output directory: a Slurm job array, workers packed on one
GPU, two commands started by hand. Before a worker trains a run it claims the run directory: it creates
<run>/claim.json with O_CREAT|O_EXCL (exactly one creator succeeds, on a local disk and on NFS v3+), holding
its host, pid, worker index and a heartbeat that a daemon thread refreshes while the run trains. A claim is
stale when its heartbeat is older than the timeout, or its pid is dead on this host (a killed worker); it is
then taken over: renamed aside first (one renamer wins), then created anew with O_EXCL. A claim is removed
when its run ends, so a complete run holds none.

A worker's share of the grid is `--worker I/N`, or FWLORA_WORKER=I/N, or a Slurm job array's task index
(SLURM_ARRAY_TASK_ID relative to SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT); fwlora.bench deals the
grid out. Clocks: hosts that share a directory should keep time (NTP) to well within the timeout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from fwlora.errors import UserError
from fwlora.files import write_json
from fwlora.records import CLAIM_FILE

log = logging.getLogger(__name__)

STALE_AFTER = 600.0  # seconds without a heartbeat before another host takes a claim over
HEARTBEAT_EVERY = 30.0
HOST = socket.gethostname()


@dataclass(frozen=True)
class Worker:
    """Worker `index` of `count`: it owns the grid's groups at positions index, index + count, ..."""

    index: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    @classmethod
    def parse(cls, text: str, source: str = "--worker") -> "Worker":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not m or not int(m[1]) < int(m[2]):
            raise UserError(f"{source}: {text!r} is not I/N with 0 <= I < N (worker I of N, counted from 0; e.g. 0/4)")
        return cls(int(m[1]), int(m[2]))

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> "Worker":
        """FWLORA_WORKER=I/N, else a Slurm job array's task, else the only worker (0/1)."""
        env = os.environ if env is None else env
        if env.get("FWLORA_WORKER"):
            return cls.parse(env["FWLORA_WORKER"], "FWLORA_WORKER")
        if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
            try:
                offset = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                index = offset // int(env.get("SLURM_ARRAY_TASK_STEP") or "1")
                count = int(env["SLURM_ARRAY_TASK_COUNT"])
            except ValueError:
                raise UserError("SLURM_ARRAY_TASK_ID/MIN/STEP/COUNT are not integers: pass --worker I/N") from None
            if not 0 <= index < count:
                raise UserError(f"Slurm array task {env['SLURM_ARRAY_TASK_ID']} is not one of {count} evenly spaced "
                                "tasks (e.g. --array=0-7): pass --worker I/N or set FWLORA_WORKER=I/N")
            return cls(index, count)
        return cls()


@dataclass(frozen=True)
class Holder:
    """What claim.json says: who holds the run, and when it last said it was alive (time.time())."""

    host: str
    pid: int
    worker: str
    token: str  # one per claim: tells this claim from a later one by the same process
    heartbeat: float
    since: float

    def describe(self) -> str:
        return f"worker {self.worker} (pid {self.pid} on {self.host})"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def is_stale(holder: Holder, stale_after: float = STALE_AFTER, now: float | None = None) -> bool:
    if holder.host == HOST and holder.pid > 0 and not pid_alive(holder.pid):
        return True
    return (time.time() if now is None else now) - holder.heartbeat > stale_after


def _read(path: Path) -> Holder | None:
    """The claim at `path`; None when there is none. A claim being written (empty or partial: O_EXCL creates
    the file before its content) reads as held by an unknown worker with its file's time as heartbeat."""
    try:
        stat = path.stat()
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(**{f.name: data[f.name] for f in dataclasses.fields(Holder)})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(host="?", pid=0, worker="?", token="", heartbeat=stat.st_mtime, since=stat.st_mtime)


def read_claim(run_dir: Path) -> Holder | None:
    return _read(Path(run_dir) / CLAIM_FILE)


class Claims:
    """The claims this process holds, kept fresh by a daemon heartbeat thread. As a context manager it
    releases every claim at exit (an interrupt included), so that other workers can take the runs at once."""

    def __init__(self, worker: Worker = Worker(), stale_after: float = STALE_AFTER,
                 heartbeat_every: float | None = None):
        self.worker, self.stale_after = worker, float(stale_after)
        self.heartbeat_every = heartbeat_every or min(HEARTBEAT_EVERY, self.stale_after / 4)
        self._held: dict[Path, Holder] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Claims":
        self._thread = threading.Thread(target=self._beat_until_stopped, name="fwlora-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for run_dir in list(self._held):
            self.release(run_dir)

    def acquire(self, run_dir: Path) -> Holder | None:
        """Claim run_dir: None when this process now holds it, else the live holder (leave the run alone)."""
        run_dir = Path(run_dir)
        path = run_dir / CLAIM_FILE
        if run_dir in self._held:
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        holder = None
        for _ in range(3):  # a claim released or set aside between our look and our create: look again
            now = time.time()
            mine = Holder(HOST, os.getpid(), str(self.worker), uuid.uuid4().hex, now, now)
            if self._create(path, mine):
                with self._lock:
                    self._held[run_dir] = mine
                return None
            holder = _read(path)
            if holder is None:
                continue
            if not is_stale(holder, self.stale_after):
                return holder
            log.warning("%s: taking over the stale claim of %s (last heartbeat %.0f s ago)", run_dir,
                        holder.describe(), time.time() - holder.heartbeat)
            self._set_aside(path)
        return holder or _read(path)

    def release(self, run_dir: Path) -> None:
        """Remove our claim on run_dir (not another worker's that took it over)."""
        run_dir = Path(run_dir)
        with self._lock:
            mine = self._held.pop(run_dir, None)
        current = _read(run_dir / CLAIM_FILE)
        if mine is not None and current is not None and current.token == mine.token:
            (run_dir / CLAIM_FILE).unlink(missing_ok=True)

    def beat(self) -> None:
        """Refresh the heartbeat of every claim held; a claim another worker took over is dropped, loudly."""
        with self._lock:
            held = list(self._held.items())
        for run_dir, mine in held:
            path = run_dir / CLAIM_FILE
            try:
                current = _read(path)
                if current is None or current.token != mine.token:
                    log.error("%s: our claim was taken over by %s (no heartbeat for %.0f s?); two workers may train "
                              "this run: raise --claim-timeout", run_dir, current.describe() if current else "nobody",
                              self.stale_after)
                    with self._lock:
                        self._held.pop(run_dir, None)
                    continue
                fresh = dataclasses.replace(mine, heartbeat=time.time())
                write_json(path, dataclasses.asdict(fresh))  # atomic: a reader sees the old or the new claim
                with self._lock:
                    if run_dir in self._held:
                        self._held[run_dir] = fresh
            except OSError as e:  # a file-system hiccup must not stop the heartbeat
                log.warning("%s: could not refresh the claim (%s); trying again in %.0f s", run_dir, e,
                            self.heartbeat_every)

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            self.beat()

    @staticmethod
    def _create(path: Path, holder: Holder) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(holder), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _set_aside(self, path: Path) -> None:
        """Rename a stale claim out of the way (atomic: of several workers judging it stale, one moves it).
        What was moved is judged again: a fresh claim made between our look and the rename goes back."""
        aside = path.with_name(f".{CLAIM_FILE}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved is not None and not is_stale(moved, self.stale_after):
            try:
                os.link(aside, path)  # back, unless a third worker has claimed the run meanwhile
            except OSError:
                log.warning("%s: a live claim of %s was moved aside and cannot go back", path.parent, moved.describe())
        aside.unlink(missing_ok=True)
