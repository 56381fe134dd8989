"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume and delete DPO jobs."""
from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from sqlalchemy import select

from api.deps import (
    CurrentCaller,
    CurrentPrincipal,
    DispatcherDep,
    JobDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    read,
    read_job,
)
from api.pagination import After, Limit, paged
from api.schemas.common import DeletedPublic, ListPublic
from api.schemas.jobs import JobPublic
from api.schemas.preflight import PreflightPublic
from service import job_deletion, preflight, submit
from service.auth import load_job
from service.db import jobs
from service.db.models import PUBLIC_STATUSES, Job, stored_statuses
from service.errors import InvalidInput, NotFound
from service.queue_info import queue_info
from service.requests import JobCreate

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning jobs"])


IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
    description="a retried request with the same key (and the same body) returns the job the first one made")]


@router.post("", response_model=JobPublic)
def create_job(req: JobCreate, session: SessionDep, storage: StorageDep, settings: SettingsDep,
               dispatcher: DispatcherDep, principal: CurrentPrincipal,
               idempotency_key: IdempotencyKey = None) -> JobPublic:
    """Validate a DPO job against its files and TrainingSpec, store it queued for the dispatcher.
    429 when the team is at its max_queued_jobs. With an Idempotency-Key, a retry returns the same job."""
    submitted = submit.create_job(session, principal, req, settings, storage, idempotency_key)
    if submitted.new:
        dispatcher.wake()
    return _shown(session, settings, submitted.job_id)


@router.post("/preflight", response_model=PreflightPublic)
def preflight_job(req: JobCreate, session: SessionDep, storage: StorageDep, settings: SettingsDep,
                  principal: CurrentPrincipal) -> PreflightPublic:
    """Check a job request without queueing it: its data as the trainer will tokenize it, the run's steps,
    tokens, FLOPs, memory and time on each GPU type of the pool, and when it would start."""
    return PreflightPublic.model_validate(preflight.preflight(session, principal, req, settings, storage))


StatusFilter = Annotated[Literal[PUBLIC_STATUSES] | None, Query(
    description="only jobs with this status (ours; OpenAI's API has no such filter)")]


@router.get("", response_model=ListPublic[JobPublic])
async def list_jobs(request: Request, settings: SettingsDep, caller: CurrentCaller, after: After = None,
                    limit: Limit = 20, status: StatusFilter = None) -> ListPublic[JobPublic]:
    """List the team's jobs (the admin: every team's), newest first; with `status`, only those."""
    return await read(request, caller, _list_jobs, settings, after, limit, status)


def _list_jobs(session, principal, settings, after: str | None, limit: int,
               status: str | None) -> ListPublic[JobPublic]:
    anchor = None
    if after:
        last = _anchor_job(session, principal, after)
        anchor = (last.created_at, last.id)
    stmt = select(*jobs.JOB_FIELDS)
    if not principal.is_admin:
        stmt = stmt.where(Job.team_id == principal.team_id)
    if status is not None:
        stmt = stmt.where(Job.status.in_(stored_statuses(status)))
    rows = session.execute(paged(stmt, (Job.created_at, Job.id), anchor, limit)).all()
    return ListPublic[JobPublic].page(_public(session, settings, rows), limit)


@router.get("/{fine_tuning_job_id}", response_model=JobPublic)
async def retrieve_job(fine_tuning_job_id: str, request: Request, settings: SettingsDep,
                       caller: CurrentCaller) -> JobPublic:
    """One job: status, progress, latest metrics, error, final model; while queued, its place and why it waits."""
    return await read_job(request, caller, fine_tuning_job_id, _retrieve_job, settings)


def _retrieve_job(session, _principal, job, settings) -> JobPublic:
    return _public(session, settings, [job])[0]


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobPublic)
def cancel_job(job: JobDep, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """Cancel a job. A queued job is cancelled at once; a running one stops within seconds (its status
    stays `running`, with `cancel_requested`, until the worker has stopped)."""
    jobs.cancel(session, job.id)
    session.commit()
    return _shown(session, settings, job.id)


@router.post("/{fine_tuning_job_id}/pause", response_model=JobPublic)
def pause_job(job: JobDep, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """Pause a job and free its worker. A queued job is paused at once; a running one checkpoints at its
    next step, then is `paused` (it stays `running`, with `pause_requested`, until then). 409 once finished."""
    jobs.pause(session, job.id)
    session.commit()
    return _shown(session, settings, job.id)


@router.post("/{fine_tuning_job_id}/resume", response_model=JobPublic)
def resume_job(job: JobDep, session: SessionDep, settings: SettingsDep, dispatcher: DispatcherDep) -> JobPublic:
    """Queue a paused job again; it goes on from the checkpoint its pause left. 409 unless it is paused;
    429 when the team is at its max_queued_jobs."""
    submit.resume(session, job)
    dispatcher.wake()
    return _shown(session, settings, job.id)


@router.delete("/{fine_tuning_job_id}", response_model=DeletedPublic)
def delete_job(job: JobDep, session: SessionDep, storage: StorageDep) -> DeletedPublic:
    """Delete what an ended job keeps (checkpoints, final model, result files, events, samples, stored
    objects); the job itself stays listed with its usage. 409 while it has not ended, or while a job not
    yet ended starts from one of its checkpoints."""
    job_deletion.delete_job(session, storage, job.id)
    return DeletedPublic(id=job.id, object="fine_tuning.job")


def _shown(session, settings, job_id: str) -> JobPublic:
    return _public(session, settings, [jobs.job_row(session, job_id)])[0]


def _public(session, settings, rows: list[jobs.JobRow]) -> list[JobPublic]:
    info = queue_info(session, settings, rows, time.time())
    return [JobPublic.of(j, *((info[j.id].position, info[j.id].reason) if j.id in info else ())) for j in rows]


def _anchor_job(session, principal, job_id: str) -> Job:
    try:
        return load_job(session, principal, job_id)
    except NotFound:
        raise InvalidInput(f"no fine-tuning job {job_id!r} to page after", param="after") from None
