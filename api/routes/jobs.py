"""/v1/fine_tuning/jobs: create, list, retrieve and cancel DPO jobs."""
from __future__ import annotations

import time

from fastapi import APIRouter
from sqlalchemy import func, select

from api import jobspec
from api.deps import (
    CurrentPrincipal,
    DispatcherDep,
    JobDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    load_file,
    load_job,
)
from api.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from api.pagination import After, Limit, page
from api.pool import queue_info
from api.schemas.common import ListPublic
from api.schemas.jobs import JobCreate, JobPublic
from api.store import jobs as store
from api.store.locks import lock_team
from api.store.models import WAITING, Job, JobStatus, Team, new_id, now

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning jobs"])


@router.post("", response_model=JobPublic)
def create_job(req: JobCreate, session: SessionDep, storage: StorageDep, settings: SettingsDep,
               dispatcher: DispatcherDep, principal: CurrentPrincipal) -> JobPublic:
    """Validate a DPO job against its files and TrainingSpec, store it queued for the dispatcher.
    429 when the team is at its max_queued_jobs."""
    train = _fine_tune_file(session, principal, req.training_file, "training_file")
    val = _fine_tune_file(session, principal, req.validation_file, "validation_file") if req.validation_file else None
    job_id = new_id("ftjob")
    built = jobspec.build(
        req, str(storage.path(train.storage_key)), str(storage.path(val.storage_key)) if val else None,
        str(storage.path(f"jobs/{job_id}")),
    )
    method = {"type": "dpo", "dpo": {"hyperparameters": built.hyperparameters}}
    _check_queue_quota(session, lock_team(session, principal.team_id))  # locked until commit: no race past it
    job = Job(
        id=job_id, team_id=principal.team_id, status=JobStatus.VALIDATING_FILES.value, model=req.model,
        training_file=train.id, validation_file=val.id if val else None, method=method,
        hyperparameters=built.hyperparameters, training=req.training, spec=built.stored, seed=built.spec.seed,
        suffix=req.suffix, metadata_=req.metadata, created_at=now(), result_files=[], cancel_requested=False,
        priority=req.priority, gpu_type=req.gpu_type, gpus=req.gpus,
    )
    session.add(job)
    session.flush()  # the row first: events reference it
    store.add_event(session, job_id, f"Created fine-tuning job: {job_id}")
    store.transition(session, job_id, JobStatus.QUEUED, (JobStatus.VALIDATING_FILES,))
    session.commit()
    dispatcher.wake()
    session.refresh(job)
    return _public(session, settings, [job])[0]


@router.get("", response_model=ListPublic[JobPublic])
def list_jobs(session: SessionDep, settings: SettingsDep, principal: CurrentPrincipal, after: After = None,
              limit: Limit = 20) -> ListPublic[JobPublic]:
    """List the team's jobs (the admin: every team's), newest first."""
    anchor = None
    if after:
        last = _anchor_job(session, principal, after)
        anchor = (last.created_at, last.id)
    stmt = select(Job) if principal.is_admin else select(Job).where(Job.team_id == principal.team_id)
    rows = page(session, stmt, (Job.created_at, Job.id), anchor, limit)
    return ListPublic[JobPublic].page(_public(session, settings, rows), limit)


@router.get("/{fine_tuning_job_id}", response_model=JobPublic)
def retrieve_job(job: JobDep, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """One job: status, progress, latest metrics, error, final model; while queued, its place and why it waits."""
    return _public(session, settings, [job])[0]


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobPublic)
def cancel_job(job: JobDep, session: SessionDep, settings: SettingsDep) -> JobPublic:
    """Cancel a job. A queued job is cancelled at once; a running one stops within seconds (its status
    stays `running`, with `cancel_requested`, until the worker has stopped)."""
    if store.request_cancel(session, job.id) is None:
        session.rollback()
        raise Conflict(f"job {job.id} is already {job.status}; only unfinished jobs can be cancelled",
                       param="fine_tuning_job_id", code="job_finished")
    session.commit()
    session.refresh(job)
    return _public(session, settings, [job])[0]


def _public(session, settings, jobs: list[Job]) -> list[JobPublic]:
    info = queue_info(session, settings, jobs, time.time())
    return [JobPublic.of(j, *((info[j.id].position, info[j.id].reason) if j.id in info else ())) for j in jobs]


def _check_queue_quota(session, team: Team) -> None:
    if team.max_queued_jobs is None:
        return
    waiting = session.scalar(select(func.count()).select_from(Job).where(
        Job.team_id == team.id, Job.status.in_([s.value for s in WAITING])))
    if waiting >= team.max_queued_jobs:
        raise QuotaExceeded(
            f"team {team.name} has {waiting} jobs waiting, its max_queued_jobs; wait until some start, "
            "or cancel some, then submit again", param=None)


def _fine_tune_file(session, principal, file_id: str, param: str):
    try:
        file = load_file(session, principal, file_id, param=param)
    except NotFound:
        raise InvalidInput(f"no uploaded file {file_id!r}; upload it with POST /v1/files first",
                           param=param, code="invalid_file") from None
    if file.team_id != principal.team_id:  # only the admin sees other teams' files
        raise InvalidInput(f"file {file_id} belongs to team {file.team_id}; a job uses files of its own team "
                           f"({principal.team_id})", param=param, code="invalid_file")
    if file.purpose != "fine-tune":
        raise InvalidInput(f"file {file_id} has purpose {file.purpose!r}, not 'fine-tune'", param=param)
    return file


def _anchor_job(session, principal, job_id: str) -> Job:
    try:
        return load_job(session, principal, job_id)
    except NotFound:
        raise InvalidInput(f"no fine-tuning job {job_id!r} to page after", param="after") from None
