"""/v1/fine_tuning/jobs/{id}/checkpoints: a job's checkpoints and final model, downloadable as tar, deletable
once the job has ended."""
from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import JobDep, SessionDep, StorageDep
from api.pagination import After, Limit, page
from api.schemas.common import DeletedPublic, ListPublic
from api.schemas.jobs import CheckpointPublic
from service.artifacts import delete_with_artifact, iter_tar, tar_entries
from service.db.models import Checkpoint, JobStatus, is_id
from service.errors import Conflict, InvalidInput, NotFound

router = APIRouter(prefix="/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", tags=["fine-tuning jobs"])


@router.get("", response_model=ListPublic[CheckpointPublic])
def list_checkpoints(job: JobDep, session: SessionDep, after: After = None,
                     limit: Limit = 10) -> ListPublic[CheckpointPublic]:
    """A job's checkpoints, latest step first; the final model is the one with `final: true`."""
    anchor = None
    if after:
        last = session.get(Checkpoint, after) if is_id(after, "ftckpt") else None
        if last is None or last.job_id != job.id:
            raise InvalidInput(f"no checkpoint {after!r} of job {job.id} to page after", param="after")
        anchor = (last.step_number, last.id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    rows = page(session, stmt, (Checkpoint.step_number, Checkpoint.id), anchor, limit)
    return ListPublic[CheckpointPublic].page([CheckpointPublic.of(c) for c in rows], limit)


@router.get("/{checkpoint_id}", response_model=CheckpointPublic)
def retrieve_checkpoint(job: JobDep, checkpoint_id: str, session: SessionDep) -> CheckpointPublic:
    """One checkpoint."""
    return CheckpointPublic.of(_checkpoint(session, job.id, checkpoint_id))


@router.get("/{checkpoint_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}}})
def checkpoint_content(job: JobDep, checkpoint_id: str, session: SessionDep,
                       storage: StorageDep) -> StreamingResponse:
    """A tar of the checkpoint directory; extracted, `transformers` loads it with from_pretrained. Only its
    regular files and directories: a symbolic link in it is left out, never followed."""
    ckpt = _checkpoint(session, job.id, checkpoint_id)
    directory = storage.path(ckpt.storage_key)
    try:
        # A link on the way (the job's directory swapped for one) leads to files the job did not write.
        if os.path.realpath(directory) != str(directory):
            raise FileNotFoundError(str(directory))
        entries = tar_entries(directory)
    except FileNotFoundError:
        raise NotFound(f"the files of checkpoint {ckpt.id} are gone (removed by save_total_limit or by hand)",
                       param="checkpoint_id", code="artifact_missing") from None
    return StreamingResponse(iter_tar(directory, ckpt.id, entries), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{ckpt.id}.tar"'})


@router.delete("/{checkpoint_id}", response_model=DeletedPublic)
def delete_checkpoint(job: JobDep, checkpoint_id: str, session: SessionDep, storage: StorageDep) -> DeletedPublic:
    """Delete a checkpoint (or the final model) of a job that has ended: its row and its files, so its bytes
    no longer count against the team's storage. 409 while the job has not ended: it may resume from them."""
    ckpt = _checkpoint(session, job.id, checkpoint_id)
    if not JobStatus(job.status).terminal:
        raise Conflict(f"job {job.id} is {job.status}; delete its checkpoints once it has ended (until then it may "
                       "resume from them)", param="fine_tuning_job_id", code="job_not_finished")
    delete_with_artifact(session, storage, ckpt)
    return DeletedPublic(id=ckpt.id, object="fine_tuning.job.checkpoint")


def _checkpoint(session, job_id: str, checkpoint_id: str) -> Checkpoint:
    ckpt = session.get(Checkpoint, checkpoint_id) if is_id(checkpoint_id, "ftckpt") else None
    if ckpt is None or ckpt.job_id != job_id:
        raise NotFound(f"no checkpoint {checkpoint_id!r} of job {job_id}", param="checkpoint_id")
    return ckpt
