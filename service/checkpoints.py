"""A job's checkpoints (and final model) as users reach them: found by id, read for download as a tar,
deleted once the job has ended."""
from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.orm import Session

from service import parents
from service.artifacts import Storage, delete_with_artifact, tar_entries
from service.db.models import Checkpoint, Job, JobStatus, is_id
from service.errors import Conflict, NotFound


def load(session: Session, job_id: str, checkpoint_id: str) -> Checkpoint:
    """Checkpoint `checkpoint_id` of job `job_id`; NotFound otherwise."""
    ckpt = session.get(Checkpoint, checkpoint_id) if is_id(checkpoint_id, "ftckpt") else None
    if ckpt is None or ckpt.job_id != job_id:
        raise NotFound(f"no checkpoint {checkpoint_id!r} of job {job_id}", param="checkpoint_id")
    return ckpt


def contents(storage: Storage, ckpt: Checkpoint) -> tuple[Path, list[tuple[Path, os.stat_result]]]:
    """The checkpoint's directory and what a download of it holds (service.artifacts.tar_entries);
    NotFound (artifact_missing) when its files are gone."""
    directory = storage.path(ckpt.storage_key)
    try:
        # A link on the way (the job's directory swapped for one) leads to files the job did not write.
        if os.path.realpath(directory) != str(directory):
            raise FileNotFoundError(str(directory))
        return directory, tar_entries(directory)
    except FileNotFoundError:
        raise NotFound(f"the files of checkpoint {ckpt.id} are gone (removed by save_total_limit or by hand)",
                       param="checkpoint_id", code="artifact_missing") from None


def delete(session: Session, storage: Storage, job: Job, ckpt: Checkpoint) -> None:
    """Delete the checkpoint's row and files (commits); Conflict (job_not_finished) while the job has not
    ended: it may resume from them; Conflict (checkpoint_in_use) while a job that starts from it has not."""
    if not JobStatus(job.status).terminal:
        raise Conflict(f"job {job.id} is {job.status}; delete its checkpoints once it has ended (until then it may "
                       "resume from them)", param="fine_tuning_job_id", code="job_not_finished")
    if users := parents.users(session, storage, ckpt):
        raise Conflict(f"checkpoint {ckpt.id} is the starting point of job {', '.join(users)}, which has not ended "
                       "(it reads these files again if it resumes); delete it once that job has ended, or cancel it",
                       param="checkpoint_id", code="checkpoint_in_use")
    delete_with_artifact(session, storage, ckpt)
