"""/v1/fine_tuning/jobs: create, list, retrieve and cancel DPO jobs."""
from __future__ import annotations

from celery.exceptions import CeleryError
from fastapi import APIRouter
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import select

from api import jobspec
from api.deps import CurrentPrincipal, JobDep, QueueDep, SessionDep, StorageDep, load_file, load_job
from api.errors import Conflict, InvalidInput, NotFound, Unavailable
from api.pagination import After, Limit, page
from api.queue import enqueue_job
from api.schemas.common import ListPublic
from api.schemas.jobs import JobCreate, JobPublic
from api.store import jobs as store
from api.store.models import Job, JobStatus, new_id, now

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning jobs"])


@router.post("", response_model=JobPublic)
def create_job(req: JobCreate, session: SessionDep, storage: StorageDep, queue: QueueDep,
               principal: CurrentPrincipal) -> JobPublic:
    """Validate a DPO job against its files and TrainingSpec, store it and queue it."""
    train = _fine_tune_file(session, principal, req.training_file, "training_file")
    val = _fine_tune_file(session, principal, req.validation_file, "validation_file") if req.validation_file else None
    job_id = new_id("ftjob")
    built = jobspec.build(
        req, str(storage.path(train.storage_key)), str(storage.path(val.storage_key)) if val else None,
        str(storage.path(f"jobs/{job_id}")),
    )
    method = {"type": "dpo", "dpo": {"hyperparameters": built.hyperparameters}}
    job = Job(
        id=job_id, status=JobStatus.VALIDATING_FILES.value, model=req.model, training_file=train.id,
        validation_file=val.id if val else None, method=method, hyperparameters=built.hyperparameters,
        training=req.training, spec=built.stored, seed=built.spec.seed, suffix=req.suffix,
        metadata_=req.metadata, created_at=now(), result_files=[], cancel_requested=False,
    )
    session.add(job)
    session.flush()  # the row first: events reference it
    store.add_event(session, job_id, f"Created fine-tuning job: {job_id}")
    store.transition(session, job_id, JobStatus.QUEUED, (JobStatus.VALIDATING_FILES,))
    session.commit()
    _enqueue(session, queue, job_id)
    session.refresh(job)
    return JobPublic.of(job)


@router.get("", response_model=ListPublic[JobPublic])
def list_jobs(session: SessionDep, principal: CurrentPrincipal, after: After = None,
              limit: Limit = 20) -> ListPublic[JobPublic]:
    """List jobs, newest first."""
    anchor = None
    if after:
        last = _anchor_job(session, principal, after)
        anchor = (last.created_at, last.id)
    rows = page(session, select(Job), (Job.created_at, Job.id), anchor, limit)
    return ListPublic[JobPublic].page([JobPublic.of(j) for j in rows], limit)


@router.get("/{fine_tuning_job_id}", response_model=JobPublic)
def retrieve_job(job: JobDep) -> JobPublic:
    """One job: status, progress, latest metrics, error, final model."""
    return JobPublic.of(job)


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobPublic)
def cancel_job(job: JobDep, session: SessionDep) -> JobPublic:
    """Cancel a job. A queued job is cancelled at once; a running one stops within seconds (its status
    stays `running`, with `cancel_requested`, until the worker has stopped)."""
    if store.request_cancel(session, job.id) is None:
        session.rollback()
        raise Conflict(f"job {job.id} is already {job.status}; only unfinished jobs can be cancelled",
                       param="fine_tuning_job_id", code="job_finished")
    session.commit()
    session.refresh(job)
    return JobPublic.of(job)


def _fine_tune_file(session, principal, file_id: str, param: str):
    try:
        file = load_file(session, principal, file_id, param=param)
    except NotFound:
        raise InvalidInput(f"no uploaded file {file_id!r}; upload it with POST /v1/files first",
                           param=param, code="invalid_file") from None
    if file.purpose != "fine-tune":
        raise InvalidInput(f"file {file_id} has purpose {file.purpose!r}, not 'fine-tune'", param=param)
    return file


def _anchor_job(session, principal, job_id: str) -> Job:
    try:
        return load_job(session, principal, job_id)
    except NotFound:
        raise InvalidInput(f"no fine-tuning job {job_id!r} to page after", param="after") from None


def _enqueue(session, queue, job_id: str) -> None:
    """Hand the job to the broker; if it is unreachable, fail the job instead of leaving it stranded."""
    try:
        enqueue_job(queue, job_id)
    except (BrokerError, CeleryError, OSError) as err:
        store.transition(session, job_id, JobStatus.FAILED, (JobStatus.QUEUED,), error_code="broker_unavailable",
                         error_message=f"the job could not be queued: the broker is unreachable ({type(err).__name__})")
        session.commit()
        raise Unavailable("the job queue (broker) is unreachable; try again shortly") from None
