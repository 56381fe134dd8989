"""The orphan sweep: stored objects that no row names any more, removed once they are older than
DPO_SWEEP_MIN_AGE_S (a younger one may belong to a write whose row is not committed yet).

What is an orphan: under `files/`, an object no File row names; under `jobs/<id>/`, every object when
there is no such job, and, for a job that has ended, an object no Checkpoint or File row names (a
checkpoint's row names its directory: the files under it locally, its tar and manifest in an object
store), plus the unfinished uploads of that prefix (Storage.remove_partial). A job that has not ended
is never touched: its run writes there, and resumes from what it wrote. Nothing outside `files/` and
`jobs/` is looked at (a local store's root is the data directory, which holds the database too).

Orphans come from deletions whose objects outlived their rows (a store that failed after the commit),
from runs killed mid-upload, and from objects put by hand. Each API process runs the sweep every
DPO_SWEEP_INTERVAL_S (`Sweeper`); `dpo-service admin sweep [--dry-run]` runs one pass now.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.artifacts import Storage, StoredObject, job_key
from service.db.engine import is_unavailable
from service.db.models import Checkpoint, File, Job, JobStatus
from service.settings import Settings

log = logging.getLogger("dpo.sweep")
UPLOADS, JOBS = "files/", "jobs/"
BATCH = 500  # keys or job ids per database query
# Beside a published directory's own key, the objects an object store keeps it as (service.artifacts).
_DIR_OBJECTS = (".tar", ".json")


@dataclass
class SweepReport:
    """What a pass removed (with dry_run: would remove), and what it could not."""

    dry_run: bool
    removed: list[StoredObject] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.removed)


def sweep(sessions: sessionmaker[Session], storage: Storage, min_age_s: float, dry_run: bool = False,
          at: float | None = None) -> SweepReport:
    """One pass over the store: remove the orphans older than `min_age_s` (with dry_run, only list them)."""
    cutoff = (time.time() if at is None else at) - min_age_s
    report = SweepReport(dry_run=dry_run)
    listed = [o for o in storage.list(JOBS) if len(o.key.split("/")) > 2]
    by_job: dict[str, list[StoredObject]] = {}
    for obj in listed:
        by_job.setdefault(obj.key.split("/")[1], []).append(obj)
    orphans, ended, named = [], [], set()
    with sessions() as session:
        orphans += _orphan_uploads(session, [o for o in storage.list(UPLOADS) if o.modified <= cutoff])
        for ids in _batches(sorted(by_job)):
            found = _job_orphans(session, {j: by_job[j] for j in ids}, cutoff)
            orphans += found.orphans
            ended += found.ended
            named |= found.named
    for key, objects in _units(orphans, listed, named):
        _remove(storage, key, objects, report)
    if not dry_run:
        for job_id in ended:
            _remove_partial(storage, job_id, report)
    if report.removed or report.failed:
        log.info("orphan sweep%s: %d objects, %d bytes%s", " (dry run)" if dry_run else "", len(report.removed),
                 report.bytes, f"; {len(report.failed)} could not be removed" if report.failed else "")
    return report


def _batches(items: list) -> Iterable[list]:
    for i in range(0, len(items), BATCH):
        yield items[i:i + BATCH]


def _orphan_uploads(session: Session, objects: list[StoredObject]) -> list[StoredObject]:
    orphans = []
    for batch in _batches(objects):
        named = set(session.scalars(select(File.storage_key).where(File.storage_key.in_([o.key for o in batch]))))
        orphans += [o for o in batch if o.key not in named]
    return orphans


@dataclass
class _Found:
    orphans: list[StoredObject]
    ended: list[str]  # the jobs that have ended (their unfinished uploads go too)
    named: set[str]  # the keys rows name under these jobs' prefixes


def _job_orphans(session: Session, objects: dict[str, list[StoredObject]], cutoff: float) -> _Found:
    """The orphans older than `cutoff` among these jobs' objects."""
    ids = list(objects)
    status = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())
    dirs = session.execute(select(Checkpoint.job_id, Checkpoint.storage_key).where(Checkpoint.job_id.in_(ids))).all()
    files = set()
    for batch in _batches([o.key for job_objects in objects.values() for o in job_objects]):
        files |= set(session.scalars(select(File.storage_key).where(File.storage_key.in_(batch))))
    found = _Found([], [], files | {key for _, key in dirs})
    own: dict[str, list[str]] = {}
    for owner, key in dirs:
        own.setdefault(owner, []).append(key)
    for job_id, job_objects in objects.items():
        if job_id in status and not JobStatus(status[job_id]).terminal:
            continue  # its run writes here, and resumes from what it wrote
        if job_id in status:
            found.ended.append(job_id)
        found.orphans += [o for o in job_objects if o.modified <= cutoff and o.key not in files
                          and not any(_names(d, o.key) for d in own.get(job_id, ()))]
    return found


def _names(row_key: str, key: str) -> bool:
    """Whether a published directory's key covers a stored object's key."""
    return key == row_key or key.startswith(f"{row_key}/") or key in (row_key + e for e in _DIR_OBJECTS)


def _units(orphans: list[StoredObject], listed: list[StoredObject], named: set[str]
           ) -> list[tuple[str, list[StoredObject]]]:
    """The orphans grouped under the widest key they fill: a job's whole prefix, or a directory under it,
    when every object listed there is an orphan and no row names a key there (so a directory goes whole,
    leaving no empty one behind); else each object alone."""
    orphan_keys = {o.key for o in orphans}
    inside: dict[str, list[StoredObject]] = {}
    for obj in listed:
        for prefix in _prefixes(obj.key):
            inside.setdefault(prefix, []).append(obj)
    rows_under = {p for k in named for p in (k, *_prefixes(k))}  # the prefixes with a key a row names
    full = {p for p, objects in inside.items() if p not in rows_under and all(o.key in orphan_keys for o in objects)}
    units: dict[str, list[StoredObject]] = {}
    for obj in orphans:
        units.setdefault(next((p for p in _prefixes(obj.key) if p in full), obj.key), []).append(obj)
    return sorted(units.items())


def _prefixes(key: str) -> list[str]:
    """`jobs/J` and the directories between it and a key under it, widest first (none outside jobs/)."""
    parts = key.split("/")
    return ["/".join(parts[:i]) for i in range(2, len(parts))] if parts[0] == JOBS.rstrip("/") else []


def _remove(storage: Storage, key: str, objects: list[StoredObject], report: SweepReport) -> None:
    if report.dry_run:
        report.removed += objects
        return
    try:
        storage.delete(key)
    except FileNotFoundError:
        return  # removed meanwhile (another API process's sweep)
    except OSError as err:
        log.warning("orphan sweep: could not remove %s: %s", key, err)
        report.failed.append(key)
        return
    report.removed += objects


def _remove_partial(storage: Storage, job_id: str, report: SweepReport) -> None:
    try:
        storage.remove_partial(job_key(job_id))
    except OSError as err:
        log.warning("orphan sweep: could not remove the unfinished uploads of job %s: %s", job_id, err)
        report.failed.append(f"{job_key(job_id)}/")


class Sweeper:
    """The sweep loop of one API process: a daemon thread, a pass every DPO_SWEEP_INTERVAL_S, the first at
    a random point of the first interval so that the API processes of a deployment do not all sweep at
    once (two passes at once remove nothing twice: a removed object is gone for the other)."""

    def __init__(self, sessions: sessionmaker[Session], storage: Storage, settings: Settings):
        self.sessions, self.storage, self.settings = sessions, storage, settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dpo-sweep", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        interval = self.settings.sweep_interval_s
        wait = random.uniform(0, interval)
        while not self._stop.wait(wait):
            try:
                sweep(self.sessions, self.storage, self.settings.sweep_min_age_s)
            except Exception as err:  # noqa: BLE001 - a failed pass is tried again at the next interval
                if is_unavailable(err):
                    log.warning("orphan sweep: the database cannot be reached (%s); trying again in %.0fs",
                                type(err).__name__, interval)
                else:
                    log.exception("orphan sweep failed; trying again in %.0fs", interval)
            wait = interval
