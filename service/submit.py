"""A new fine-tuning job: the request checked against its files, models and TrainingSpec, then, under
the team's lock, against the team's queue and storage quotas, and stored `queued` for the dispatcher.
A request retried with the same Idempotency-Key gets the job the first one made."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import jobspec, parents
from service.artifacts import Storage, job_key
from service.auth import Principal, load_file
from service.db import jobs
from service.db.locks import lock_files, lock_team
from service.db.models import WAITING, File, Job, JobStatus, Preflight, Team, new_id, now
from service.db.quota import refuse_job_over_quota
from service.errors import Conflict, InvalidInput, NotFound, QuotaExceeded
from service.model_paths import model_problem
from service.requests import INT64, JobCreate
from service.settings import Settings
from service.tracking import refuse_unavailable_trackers


# A job created from the same request within this time of a pre-flight report keeps its estimate.
PREFLIGHT_KEPT_S = 3600


@dataclass(frozen=True)
class Submitted:
    job_id: str
    new: bool  # False: an earlier request with the same Idempotency-Key made the job


def create_job(session: Session, principal: Principal, req: JobCreate, settings: Settings, storage: Storage,
               idempotency_key: str | None = None) -> Submitted:
    """Store a valid request as a queued job and commit; InvalidInput naming the problem, QuotaExceeded
    when the team is at its max_queued_jobs or storage limit, Conflict for a key reused for another request."""
    digest = request_hash(req) if idempotency_key else None
    if idempotency_key and (earlier := _replay(session, principal, idempotency_key, digest)):
        return Submitted(earlier, new=False)
    job, _ = validate(req, session, storage, settings, principal)
    job.idempotency_key, job.request_hash = idempotency_key, digest
    job.estimate = preflight_estimate(session, principal.team_id, digest or request_hash(req), time.time())
    team = lock_team(session, principal.team_id)  # locked until commit: no race past the checks below
    if idempotency_key and (earlier := _replay(session, principal, idempotency_key, digest)):
        session.rollback()  # a twin request made it while we validated
        return Submitted(earlier, new=False)
    _check_queue_quota(session, team)
    _files_still_there(session, job)
    refuse_job_over_quota(session, team, settings)
    session.add(job)
    session.flush()  # the row first: events reference it
    jobs.add_event(session, job.id, f"Created fine-tuning job: {job.id}", data={"code": "created"})
    jobs.status_event(session, job.id, JobStatus.QUEUED)
    session.commit()
    return Submitted(job.id, new=True)


def validate(req: JobCreate, session: Session, storage: Storage, settings: Settings,
             principal: Principal) -> tuple[Job, jobspec.BuiltSpec]:
    """The job row for a valid request (not yet added) and its spec, whose paths are the store's keys (the
    training and validation files', the job's output prefix): the API reads no local path, and the
    worker puts its own (service.jobspec.runnable). InvalidInput naming every problem otherwise. Job
    creation and the pre-flight report share it."""
    _check_numbers(req.model_dump(mode="python"))
    start = parents.resolve(session, principal, storage, req.model) if parents.names_parent(req.model) else None
    if start is None:
        _check_model(req.model, settings, "model")
    train = _fine_tune_file(session, principal, req.training_file, "training_file")
    val = _fine_tune_file(session, principal, req.validation_file, "validation_file") if req.validation_file else None
    job_id = new_id("ftjob")
    built = jobspec.build(
        req, train.storage_key, val.storage_key if val else None, job_key(job_id), jobspec.DataFile.of(train),
        jobspec.DataFile.of(val) if val else None, keep_checkpoints=settings.keep_checkpoints, start=start,
    )
    if built.spec.reference_model:
        _check_reference(built.spec.reference_model, settings)
    if built.spec.samples is not None and built.spec.samples.reward_model:
        _check_model(built.spec.samples.reward_model, settings, "training.samples.reward_model")
    refuse_unavailable_trackers(session, built.spec.report_to, req.gpu_type, req.gpus, settings.worker_lost_after_s,
                                time.time())
    method = {"type": "dpo", "dpo": {"hyperparameters": built.hyperparameters}}
    job = Job(
        id=job_id, team_id=principal.team_id, status=JobStatus.QUEUED.value, model=req.model,
        training_file=train.id, validation_file=val.id if val else None, method=method,
        hyperparameters=built.hyperparameters, training=req.training, spec=built.stored,
        report_to=list(built.spec.report_to), seed=built.spec.seed, suffix=req.suffix, metadata_=req.metadata,
        created_at=now(), result_files=[], cancel_requested=False, priority=req.priority, gpu_type=req.gpu_type,
        gpus=req.gpus, max_attempts=req.max_attempts or settings.job_max_attempts,
        parent_checkpoint=start.checkpoint if start else None, parent_job=start.job if start else None,
    )
    return job, built


def preflight_estimate(session: Session, team_id: str, digest: str, at: float) -> dict | None:
    """The estimate of this team's latest pre-flight report of the same request, if it is recent."""
    found = session.scalars(select(Preflight).where(
        Preflight.team_id == team_id, Preflight.request_hash == digest,
        Preflight.created_at >= at - PREFLIGHT_KEPT_S).order_by(Preflight.created_at.desc()).limit(1)).first()
    return found.estimate if found is not None else None


def _check_model(name: str, settings: Settings, param: str) -> None:
    if problem := model_problem(name, settings.model_dirs):
        raise InvalidInput(problem, param=param, code="invalid_model")


def _check_reference(name: str, settings: Settings) -> None:
    if parents.names_parent(name):
        raise InvalidInput("training.reference_model: a checkpoint or job id is taken as model only, where the "
                           "reference defaults to it; give a model directory or hub id here",
                           param="training.reference_model", code="invalid_model")
    _check_model(name, settings, "training.reference_model")


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


def request_hash(req: JobCreate) -> str:
    canonical = json.dumps(req.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(session: Session, principal: Principal, key: str, digest: str | None) -> str | None:
    """The id of the job an earlier request with this Idempotency-Key made (Conflict if that request was another)."""
    earlier = session.execute(select(Job.id, Job.request_hash).where(
        Job.team_id == principal.team_id, Job.idempotency_key == key)).one_or_none()
    if earlier is not None and earlier.request_hash != digest:
        raise Conflict(f"Idempotency-Key {key!r} was used for another request (job {earlier.id}); use a new key "
                       "for a new request", param="Idempotency-Key", code="idempotency_key_reused")
    return earlier.id if earlier is not None else None


def _files_still_there(session: Session, job: Job) -> None:
    """Lock the job's files until commit: a delete of one waits for the job and then sees it (409
    file_in_use); a delete that came first leaves nothing to use (400 here, no job made)."""
    files = {"training_file": job.training_file, "validation_file": job.validation_file}
    present = lock_files(session, [f for f in files.values() if f])
    for param, file_id in files.items():
        if file_id and file_id not in present:
            raise InvalidInput(f"file {file_id} was deleted while the job was being created; upload it again",
                               param=param, code="invalid_file")


def resume(session: Session, job: Job) -> None:
    """Queue a paused job again (service.db.jobs.resume), as a new job would be: QuotaExceeded when its
    team is at its max_queued_jobs; Conflict when it is not paused. Commits."""
    team = lock_team(session, job.team_id)  # locked until commit, as create_job's check
    _check_queue_quota(session, team)
    jobs.resume(session, job.id)
    session.commit()


def _check_queue_quota(session: Session, team: Team) -> None:
    if team.max_queued_jobs is None:
        return
    waiting = session.scalar(select(func.count()).select_from(Job).where(
        Job.team_id == team.id, Job.status.in_([s.value for s in WAITING])))
    if waiting >= team.max_queued_jobs:
        raise QuotaExceeded(
            f"team {team.name} has {waiting} jobs waiting, its max_queued_jobs; wait until some start, "
            "or cancel some, then submit again", param=None)


def _fine_tune_file(session: Session, principal: Principal, file_id: str, param: str) -> File:
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
