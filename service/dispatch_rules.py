"""The pieces of the dispatch rule, each defined once: the order of a team's queue, what a worker can
serve, and whether a team is at its running limit. service.scheduler decides with them; service.queue_info
tells a waiting job's place and reason with the same ones, so what users are told cannot drift from what
the scheduler does."""
from __future__ import annotations

from sqlalchemy import ColumnElement, Over, and_, func, or_, select
from sqlalchemy.orm import Session

from service.db.models import ON_WORKER, Job

# Within a team: the highest priority first, then the oldest (the id breaks a tie of the same second).
TEAM_ORDER = (Job.priority.desc(), Job.created_at, Job.id)


def team_rank() -> Over:
    """SQL: a job's 1-based place in its team's queue (TEAM_ORDER) among the jobs the query selects."""
    return func.row_number().over(partition_by=Job.team_id, order_by=TEAM_ORDER)


def serves(gpu_type, gpus, job_gpu_type=Job.gpu_type, job_gpus=Job.gpus) -> ColumnElement[bool]:
    """SQL: a job that a worker with `gpus` GPUs of type `gpu_type` can run (the job's gpu_type, if it
    names one, is the worker's, and the job asks for no more GPUs than the worker has). Each side is a
    value or a column: the jobs a worker serves (the default), or the workers that serve a job not yet
    stored (`serves(Worker.gpu_type, Worker.gpus, literal(...), literal(...))`)."""
    return and_(or_(job_gpu_type.is_(None), job_gpu_type == gpu_type), job_gpus <= gpus)


def running_by_team(session: Session, team_ids: list[str]) -> dict[str, int]:
    """Each team's jobs that hold a worker (dispatched or running); a team with none is absent."""
    stmt = (select(Job.team_id, func.count()).where(Job.team_id.in_(team_ids),
                                                    Job.status.in_([x.value for x in ON_WORKER]))
            .group_by(Job.team_id))
    return dict(session.execute(stmt).all())


def at_running_limit(max_running_jobs: int | None, running: int) -> bool:
    """Whether a team with this limit (None: none) and this many jobs on workers may start no other."""
    return max_running_jobs is not None and running >= max_running_jobs
