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
    with sessions() as session:
        orphans = _orphan_uploads(session, _old(storage.list(UPLOADS), cutoff))
        by_job: dict[str, list[StoredObject]] = {}
        for obj in _old(storage.list(JOBS), cutoff):
            by_job.setdefault(obj.key.split("/")[1], []).append(obj)
        ended = []
        for ids in _batches(sorted(by_job)):
            found, done = _job_orphans(session, {j: by_job[j] for j in ids})
            orphans += found
            ended += done
    for obj in orphans:
        _remove(storage, obj, report)
    if not dry_run:
        for job_id in ended:
            _remove_partial(storage, job_id, report)
    if report.removed or report.failed:
        log.info("orphan sweep%s: %d objects, %d bytes%s", " (dry run)" if dry_run else "", len(report.removed),
                 report.bytes, f"; {len(report.failed)} could not be removed" if report.failed else "")
    return report


def _old(objects: Iterable[StoredObject], cutoff: float) -> list[StoredObject]:
    return [o for o in objects if o.modified <= cutoff and len(o.key.split("/")) > 1]


def _batches(items: list) -> Iterable[list]:
    for i in range(0, len(items), BATCH):
        yield items[i:i + BATCH]


def _orphan_uploads(session: Session, objects: list[StoredObject]) -> list[StoredObject]:
    orphans = []
    for batch in _batches(objects):
        named = set(session.scalars(select(File.storage_key).where(File.storage_key.in_([o.key for o in batch]))))
        orphans += [o for o in batch if o.key not in named]
    return orphans


def _job_orphans(session: Session, objects: dict[str, list[StoredObject]]) -> tuple[list[StoredObject], list[str]]:
    """The orphans among these jobs' objects, and the ids of those jobs that have ended."""
    ids = list(objects)
    status = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())
    named = {(r.job_id, r.storage_key) for r in session.execute(
        select(Checkpoint.job_id, Checkpoint.storage_key).where(Checkpoint.job_id.in_(ids)))}
    keys = [o.key for job_objects in objects.values() for o in job_objects]
    files = set()
    for batch in _batches(keys):
        files |= set(session.scalars(select(File.storage_key).where(File.storage_key.in_(batch))))
    orphans, ended = [], []
    for job_id, job_objects in objects.items():
        if job_id in status and not JobStatus(status[job_id]).terminal:
            continue  # its run writes here, and resumes from what it wrote
        if job_id in status:
            ended.append(job_id)
        dirs = [key for owner, key in named if owner == job_id]
        orphans += [o for o in job_objects if o.key not in files and not any(_names(d, o.key) for d in dirs)]
    return orphans, ended


def _names(row_key: str, key: str) -> bool:
    """Whether a published directory's key covers a stored object's key."""
    return key == row_key or key.startswith(f"{row_key}/") or key in (row_key + e for e in _DIR_OBJECTS)


def _remove(storage: Storage, obj: StoredObject, report: SweepReport) -> None:
    if report.dry_run:
        report.removed.append(obj)
        return
    try:
        storage.delete(obj.key)
    except FileNotFoundError:
        return  # removed meanwhile (another API process's sweep)
    except OSError as err:
        log.warning("orphan sweep: could not remove %s: %s", obj.key, err)
        report.failed.append(obj.key)
        return
    report.removed.append(obj)


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
