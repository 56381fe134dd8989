"""/v1/fine_tuning/jobs/{id}/checkpoints: a job's checkpoints and final model, downloadable as tar, deletable
once the job has ended."""
from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select

from api import byte_ranges
from api.deps import IfRangeHeader, JobDep, RangeHeader, SessionDep, SettingsDep, StorageDep
from api.pagination import After, Limit, page
from api.schemas.common import DeletedPublic, DownloadLinkPublic, ListPublic
from api.schemas.jobs import CheckpointPublic
from service import checkpoints
from service.db.models import Checkpoint, is_id
from service.errors import InvalidInput

router = APIRouter(prefix="/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", tags=["fine-tuning jobs"])
_CONTENT = {200: {"content": {"application/x-tar": {}}},
            307: {"description": "with an object store: the presigned URL of the tar (Location)"},
            **byte_ranges.RESPONSES}


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
    return CheckpointPublic.of(checkpoints.load(session, job.id, checkpoint_id))


@router.head("/{checkpoint_id}/content", response_class=Response, responses=byte_ranges.head_responses(_CONTENT))
@router.get("/{checkpoint_id}/content", response_class=StreamingResponse, responses=_CONTENT)
def checkpoint_content(request: Request, job: JobDep, checkpoint_id: str, session: SessionDep, storage: StorageDep,
                       settings: SettingsDep, range_: RangeHeader = None, if_range: IfRangeHeader = None) -> Response:
    """A tar of the checkpoint directory (its entries under `<checkpoint id>/`), with its exact Content-Length;
    extracted, `transformers` loads it with from_pretrained. Only its regular files and directories: a
    symbolic link in it is left out, never followed. With an object store, a redirect to a presigned URL.
    HEAD answers the same status and headers without the body (its redirect is presigned for HEAD)."""
    ckpt = checkpoints.load(session, job.id, checkpoint_id)
    if url := checkpoints.presigned(storage, settings, ckpt, request.method):
        return RedirectResponse(url, status_code=307)
    tar = checkpoints.contents(storage, ckpt)
    with checkpoints.reading(ckpt):
        return byte_ranges.respond(tar.size, tar.read, range_, if_range, "application/x-tar",
                                   {"Content-Disposition": f'attachment; filename="{ckpt.id}.tar"'},
                                   head=request.method == "HEAD")


@router.post("/{checkpoint_id}/content/url", response_model=DownloadLinkPublic,
             responses={409: {"description": "download_link_unavailable: the API streams the content itself"}})
def checkpoint_content_url(job: JobDep, checkpoint_id: str, session: SessionDep, storage: StorageDep,
                           settings: SettingsDep) -> DownloadLinkPublic:
    """A short-lived URL of the checkpoint's tar that needs no API key (a presigned URL of the object store)."""
    link = checkpoints.link(storage, settings, checkpoints.load(session, job.id, checkpoint_id))
    return DownloadLinkPublic(url=link.url, expires_at=link.expires_at)


@router.delete("/{checkpoint_id}", response_model=DeletedPublic)
def delete_checkpoint(job: JobDep, checkpoint_id: str, session: SessionDep, storage: StorageDep) -> DeletedPublic:
    """Delete a checkpoint (or the final model) of a job that has ended: its row and its files, so its bytes
    no longer count against the team's storage. 409 while the job has not ended: it may resume from them."""
    ckpt = checkpoints.load(session, job.id, checkpoint_id)
    checkpoints.delete(session, storage, job, ckpt)
    return DeletedPublic(id=ckpt.id, object="fine_tuning.job.checkpoint")
