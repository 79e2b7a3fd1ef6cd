"""Where the studies live (Optuna storages), and what keeps workers honest: a file lock for local
storages, heartbeats for databases.

  * default: <output-dir>/optuna.journal (JournalStorage + JournalFileBackend): an append-only log with
    a file lock, safe for several processes on one machine; --storage PATH (no "://") puts it elsewhere.
  * sqlite:///FILE: works, but SQLite serialises writers ("database is locked" under contention).
  * postgresql://... or mysql+pymysql://... (a server, its driver installed): several machines share
    the study. A running trial records a heartbeat every --heartbeat-seconds (60); a trial whose last
    beat is older than --grace-seconds (300) is marked FAIL by the next worker that looks, with the
    reason in its "fail_reason" attribute, and another trial replaces it.
  * redis://host:6379 (the `redis` package): a journal in Redis, multi-machine, without heartbeats.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import random
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from fwlora.errors import UserError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna.journal"
HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 300
# environment defaults of --heartbeat-seconds / --grace-seconds (short values for tests and demos)
HEARTBEAT_ENV, GRACE_ENV = "FWLORA_SWEEP_HEARTBEAT", "FWLORA_SWEEP_GRACE"


@dataclass
class Storage:
    storage: Any  # an optuna BaseStorage
    description: str
    lock_path: Path | None  # a local file lock that makes count-and-take atomic, when there is a local file

    @property
    def local(self) -> bool:
        """A file on this machine (journal, SQLite): every worker runs here, so a dead one is a gone pid."""
        return self.lock_path is not None

    @property
    def heartbeat_interval(self) -> int | None:
        return heartbeat_interval(self.storage)


def heartbeat_interval(storage: Any) -> int | None:
    """Seconds between heartbeats, or None where the storage keeps none (journal, Redis)."""
    getter = getattr(storage, "get_heartbeat_interval", None)
    return getter() if getter is not None and hasattr(storage, "record_heartbeat") else None


def open_storage(url: str | None, output_dir: Path, heartbeat_seconds: int = HEARTBEAT_SECONDS,
                 grace_seconds: int = GRACE_SECONDS) -> Storage:
    """The default journal file, a journal at a path, an RDB URL (with heartbeats) or Redis."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not url or "://" not in url:
        path = Path(url) if url else Path(output_dir) / JOURNAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            storage = JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise UserError(f"--storage {path}: cannot open the journal file ({e})") from None
        return Storage(storage, f"journal file {path}", path.with_name(path.name + ".sweep.lock"))
    if url.startswith("redis"):
        try:
            from optuna.storages.journal import JournalRedisBackend

            return Storage(JournalStorage(JournalRedisBackend(url)), f"redis journal {url}", None)
        except ImportError:
            raise UserError("--storage redis://...: install the redis package (pip install redis)") from None
    url = with_postgres_driver(url)
    lock_path = None
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = db.with_name(db.name + ".sweep.lock")
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for a busy writer instead of failing at once
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds,
                                                     grace_period=grace_seconds)
            return Storage(storage, f"database {redact(url)}", lock_path)
        except (ImportError, ModuleNotFoundError) as e:
            raise UserError(f"--storage {redact(url)}: the database driver is missing ({e}); for PostgreSQL: "
                            "pip install psycopg2-binary (or psycopg[binary])") from None
        except Exception as e:  # SQLAlchemy's many connection errors: say which URL, without its password
            error = e
            if attempt < 2 and _creation_race(e):
                # workers started together on an empty database race to create Optuna's tables: the loser retries
                log.info("--storage %s: %s while creating the tables; retrying", redact(url), type(e).__name__)
                time.sleep(0.5 + random.random())
                continue
            break
    raise UserError(f"--storage {redact(url)}: cannot open the database ({type(error).__name__}: {error})") from None


def with_postgres_driver(url: str) -> str:
    """postgresql://... with the PostgreSQL driver that is installed. SQLAlchemy picks one for a bare
    postgresql:// (psycopg2 up to 2.0, psycopg 3 from 2.1) and fails when that one is missing, although
    the other would do; postgres:// (Heroku's spelling) is not accepted at all."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}{sep}{rest}"
    return f"postgresql{sep}{rest}"  # the error then names the missing module


def _creation_race(error: Exception) -> bool:
    """A duplicate table or version row from a worker that created them a moment earlier (not a refused
    connection or a bad URL, which a retry would not mend)."""
    import sqlalchemy.exc

    if isinstance(error, sqlalchemy.exc.OperationalError):
        return False
    return isinstance(error, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, AssertionError))


def redact(url: str) -> str:
    """The URL without its password, for messages and outputs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            rest = cred.split(":", 1)[0] + ":***@" + host
    return scheme + sep + rest


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    """Exclusive across processes of this machine; a no-op where there is no local file (or no fcntl)."""
    if path is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: the trial-number check after taking a trial still keeps the total
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def beat(storage: Any, trial: "optuna.Trial") -> None:
    """One heartbeat now: a trial with none is never taken for stale, so the first comes right after ask()."""
    if heartbeat_interval(storage):
        storage.record_heartbeat(trial._trial_id)  # ask/tell has no public handle; Optuna's optimize does the same


@contextlib.contextmanager
def heartbeat(storage: Any, trial: "optuna.Trial") -> Iterator[None]:
    """Record the trial's heartbeat while it runs (RDB storage only; see fail_stale_trials)."""
    interval = heartbeat_interval(storage)
    if not interval:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                storage.record_heartbeat(trial._trial_id)
            except Exception as e:  # a lost connection must not kill the run; the next beat retries
                log.warning("heartbeat of trial %d failed: %s", trial.number, e)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=loop, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study: "optuna.Study") -> list[int]:
    """Mark FAIL the running trials whose worker stopped beating (RDB storage), each with its reason in
    "fail_reason"; return their numbers. Several workers may race here: each trial is failed once."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    if not heartbeat_interval(storage):
        return []
    stale_ids = getattr(storage, "_get_stale_trial_ids", None)  # what optuna.storages.fail_stale_trials uses
    if stale_ids is None:  # another storage class: Optuna's own function, without the reason
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return []
    backend = getattr(storage, "_backend", storage)  # a study holds its RDBStorage inside Optuna's cache
    grace = getattr(backend, "grace_period", None) or 2 * heartbeat_interval(storage)
    failed = []
    for trial_id in stale_ids(study._study_id):
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", f"no heartbeat for over {grace} s: its worker "
                                        "stopped (killed, or its machine or connection died); replaced")
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(storage.get_trial_number_from_id(trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
            continue
    for number in failed:
        log.warning("%s: trial %d sent no heartbeat for over %s s: marked failed (another trial replaces it)",
                    study.study_name, number, grace)
    return failed
