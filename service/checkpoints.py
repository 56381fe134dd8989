"""A job's checkpoints (and final model) as users reach them: found by id, read for download as a tar,
deleted once the job has ended."""
from __future__ import annotations

from sqlalchemy.orm import Session

from service import downloads, parents
from service.artifacts import Storage, TarDownload, delete_with_artifact
from service.db.models import Checkpoint, Job, JobStatus, is_id
from service.errors import Conflict, NotFound
from service.settings import Settings


def load(session: Session, job_id: str, checkpoint_id: str) -> Checkpoint:
    """Checkpoint `checkpoint_id` of job `job_id`; NotFound otherwise."""
    ckpt = session.get(Checkpoint, checkpoint_id) if is_id(checkpoint_id, "ftckpt") else None
    if ckpt is None or ckpt.job_id != job_id:
        raise NotFound(f"no checkpoint {checkpoint_id!r} of job {job_id}", param="checkpoint_id")
    return ckpt


def contents(storage: Storage, ckpt: Checkpoint) -> TarDownload:
    """The checkpoint as a tar download, its entries under `<checkpoint id>/`; NotFound (artifact_missing)
    when its files are gone, StorageFailed when the store cannot answer."""
    with reading(ckpt):
        return storage.dir_tar(ckpt.storage_key, ckpt.id)


def presigned(storage: Storage, settings: Settings, ckpt: Checkpoint, method: str = "GET") -> str | None:
    """A presigned URL of the checkpoint's tar for `method`, or None when the API streams it (service.downloads)."""
    with reading(ckpt):
        return downloads.presigned_url(storage, settings, ckpt.storage_key, f"{ckpt.id}.tar", directory=True,
                                       method=method)


def link(storage: Storage, settings: Settings, ckpt: Checkpoint) -> downloads.DownloadLink:
    """A link to the checkpoint's tar that needs no API key (service.downloads.link)."""
    with reading(ckpt):
        return downloads.link(storage, settings, ckpt.storage_key, f"{ckpt.id}.tar", "checkpoint_id", directory=True)


def reading(ckpt: Checkpoint):
    """Store errors while reading the checkpoint, as the API answers them (service.downloads.reading)."""
    return downloads.reading(NotFound(f"the files of checkpoint {ckpt.id} are gone (removed by save_total_limit "
                                      "or by hand)", param="checkpoint_id", code="artifact_missing"),
                             f"checkpoint {ckpt.id}")


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
