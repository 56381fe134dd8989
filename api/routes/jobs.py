"""/v1/fine_tuning/jobs: create, list, retrieve and cancel DPO jobs."""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Annotated

from fastapi import APIRouter, Header, Request
from sqlalchemy import func, select

from api.deps import (
    CurrentCaller,
    CurrentPrincipal,
    DispatcherDep,
    JobDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    load_file,
    load_job,
    read,
    read_job,
)
from api.pagination import After, Limit, paged
from api.schemas.common import ListPublic
from api.schemas.jobs import JobPublic
from service import jobspec
from service.db import jobs
from service.db.locks import lock_files, lock_team
from service.db.models import WAITING, Job, JobStatus, Team, new_id, now
from service.db.quota import refuse_job_over_quota
from service.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from service.model_paths import model_problem
from service.queue_info import queue_info
from service.requests import INT64, JobCreate

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
    digest = _request_hash(req) if idempotency_key else None
    if idempotency_key and (earlier := _replay(session, principal, idempotency_key, digest)):
        return _shown(session, settings, earlier.id)
    job = _new_job(req, session, storage, settings, principal)
    job.idempotency_key, job.request_hash = idempotency_key, digest
    team = lock_team(session, principal.team_id)  # locked until commit: no race past the checks below
    if idempotency_key and (earlier := _replay(session, principal, idempotency_key, digest)):
        session.rollback()  # a twin request made it while we validated
        return _shown(session, settings, earlier.id)
    _check_queue_quota(session, team)
    _files_still_there(session, job)
    refuse_job_over_quota(session, team, settings)
    session.add(job)
    session.flush()  # the row first: events reference it
    jobs.add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    jobs.status_event(session, job.id, JobStatus.QUEUED)
    session.commit()
    dispatcher.wake()
    return _shown(session, settings, job.id)


def _new_job(req: JobCreate, session, storage, settings, principal) -> Job:
    """The job row for a valid request (not yet added); InvalidInput naming every problem otherwise."""
    _check_numbers(req.model_dump(mode="python"))
    _check_model(req.model, settings, "model")
    train = _fine_tune_file(session, principal, req.training_file, "training_file")
    val = _fine_tune_file(session, principal, req.validation_file, "validation_file") if req.validation_file else None
    job_id = new_id("ftjob")
    built = jobspec.build(
        req, str(storage.path(train.storage_key)), str(storage.path(val.storage_key)) if val else None,
        str(storage.path(f"jobs/{job_id}")), jobspec.DataFile.of(train), jobspec.DataFile.of(val) if val else None,
        keep_checkpoints=settings.keep_checkpoints,
    )
    if built.spec.reference_model:
        _check_model(built.spec.reference_model, settings, "training.reference_model")
    method = {"type": "dpo", "dpo": {"hyperparameters": built.hyperparameters}}
    return Job(
        id=job_id, team_id=principal.team_id, status=JobStatus.QUEUED.value, model=req.model,
        training_file=train.id, validation_file=val.id if val else None, method=method,
        hyperparameters=built.hyperparameters, training=req.training, spec=built.stored, seed=built.spec.seed,
        suffix=req.suffix, metadata_=req.metadata, created_at=now(), result_files=[], cancel_requested=False,
        priority=req.priority, gpu_type=req.gpu_type, gpus=req.gpus,
        max_attempts=req.max_attempts or settings.job_max_attempts,
    )


def _check_model(name: str, settings, param: str) -> None:
    if problem := model_problem(name, settings.model_dirs):
        raise InvalidInput(problem, param=param, code="invalid_model")


def _check_numbers(value, path: str = "") -> None:
    """Every number in the request is finite and fits the database (JSON allows NaN, Infinity, 10**100)."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"{path}: must be a finite number", param=path or None)
    if isinstance(value, int) and abs(value) > INT64:
        raise InvalidInput(f"{path}: must be between -{INT64} and {INT64}", param=path or None)
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_numbers(item, f"{path}.{i}")


def _request_hash(req: JobCreate) -> str:
    canonical = json.dumps(req.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(session, principal, key: str, digest: str | None) -> Job | None:
    """The job an earlier request with this Idempotency-Key made (409 if that request was another)."""
    job = session.scalars(select(Job).where(Job.team_id == principal.team_id, Job.idempotency_key == key)
                          .execution_options(populate_existing=True)).one_or_none()
    if job is not None and job.request_hash != digest:
        raise Conflict(f"Idempotency-Key {key!r} was used for another request (job {job.id}); use a new key "
                       "for a new request", param="Idempotency-Key", code="idempotency_key_reused")
    return job


@router.get("", response_model=ListPublic[JobPublic])
async def list_jobs(request: Request, settings: SettingsDep, caller: CurrentCaller, after: After = None,
                    limit: Limit = 20) -> ListPublic[JobPublic]:
    """List the team's jobs (the admin: every team's), newest first."""
    return await read(request, caller, _list_jobs, settings, after, limit)


def _list_jobs(session, principal, settings, after: str | None, limit: int) -> ListPublic[JobPublic]:
    anchor = None
    if after:
        last = _anchor_job(session, principal, after)
        anchor = (last.created_at, last.id)
    stmt = select(*jobs.JOB_FIELDS)
    if not principal.is_admin:
        stmt = stmt.where(Job.team_id == principal.team_id)
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
    if jobs.request_cancel(session, job.id) is None:
        session.rollback()
        raise Conflict(f"job {job.id} is already {job.status}; only unfinished jobs can be cancelled",
                       param="fine_tuning_job_id", code="job_finished")
    session.commit()
    return _shown(session, settings, job.id)


def _shown(session, settings, job_id: str) -> JobPublic:
    return _public(session, settings, [jobs.job_row(session, job_id)])[0]


def _public(session, settings, rows: list[jobs.JobRow]) -> list[JobPublic]:
    info = queue_info(session, settings, rows, time.time())
    return [JobPublic.of(j, *((info[j.id].position, info[j.id].reason) if j.id in info else ())) for j in rows]


def _files_still_there(session, job: Job) -> None:
    """Lock the job's files until commit: a delete of one waits for the job and then sees it (409
    file_in_use); a delete that came first leaves nothing to use (400 here, no job made)."""
    files = {"training_file": job.training_file, "validation_file": job.validation_file}
    present = lock_files(session, [f for f in files.values() if f])
    for param, file_id in files.items():
        if file_id and file_id not in present:
            raise InvalidInput(f"file {file_id} was deleted while the job was being created; upload it again",
                               param=param, code="invalid_file")


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
