"""Deleting what an ended job keeps: its checkpoints and final model, its result files, events and
samples, and every stored object under its prefix, so that none of it counts against its team's
storage any more. The job row stays, with its runs: they are the record of what the team ran (its
usage, GPU-seconds and trained tokens)."""
from __future__ import annotations

import logging

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from service import parents
from service.artifacts import Storage, job_key
from service.db.locks import writer_lock
from service.db.models import Checkpoint, Event, File, Job, JobStatus, Sample
from service.errors import Conflict, NotFound

log = logging.getLogger("dpo.storage")


def delete_job(session: Session, storage: Storage, job_id: str) -> None:
    """Delete an ended job's rows (checkpoints, result files, events, samples), commit, then its objects.
    Conflict job_not_finished while it has not ended (it may resume from its checkpoints), Conflict
    checkpoint_in_use while a job not yet ended starts from one of them. Objects a failed store leaves
    behind are no row's any more: the orphan sweep (service.sweep) removes them."""
    writer_lock(session)
    job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()
                          .execution_options(populate_existing=True)).one_or_none()
    if job is None:
        raise NotFound(f"no fine-tuning job {job_id!r}: it was deleted meanwhile", param="fine_tuning_job_id")
    if not JobStatus(job.status).terminal:
        raise Conflict(f"job {job.id} is {job.status}; delete it once it has ended (cancel it first to end it now)",
                       param="fine_tuning_job_id", code="job_not_finished")
    ckpts = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)).all()
    _refuse_in_use(session, storage, job, ckpts)
    results = session.scalars(select(File).where(_result_files(job))).all()
    keys = {job_key(job.id), *(c.storage_key for c in ckpts), *(f.storage_key for f in results)}
    for table in (Sample, Event, Checkpoint):
        session.execute(delete(table).where(table.job_id == job.id).execution_options(synchronize_session=False))
    session.execute(delete(File).where(File.id.in_([f.id for f in results])).execution_options(
        synchronize_session=False))
    session.commit()  # the rows first: a failure below leaves bytes no row names, never a row without them
    _delete_objects(storage, job.id, keys)


def _refuse_in_use(session: Session, storage: Storage, job: Job, ckpts: list[Checkpoint]) -> None:
    for ckpt in ckpts:
        if users := parents.users(session, storage, ckpt):
            raise Conflict(f"checkpoint {ckpt.id} of job {job.id} is the starting point of job {', '.join(users)}, "
                           "which has not ended (it reads these files again if it resumes); delete the job once "
                           "that one has ended, or cancel it", param="fine_tuning_job_id", code="checkpoint_in_use")


def _result_files(job: Job):
    """The job's result files: those it lists, and any other file stored under its prefix."""
    listed = [f for f in job.result_files or [] if isinstance(f, str)]
    return or_(File.id.in_(listed), File.storage_key.startswith(f"{job_key(job.id)}/", autoescape=True))


def _delete_objects(storage: Storage, job_id: str, keys: set[str]) -> None:
    prefix = job_key(job_id)
    try:
        storage.remove_partial(prefix)  # an upload a lost run left unfinished
        for key in sorted(keys):
            if key == prefix or not key.startswith(f"{prefix}/"):
                storage.delete(key)
    except OSError as err:
        log.warning("job %s deleted; some of its objects are left for the orphan sweep: %s", job_id, err)
