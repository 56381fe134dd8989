"""The pieces of the dispatch rule, each defined once: the order of a team's queue, what a worker can
serve (its GPUs, and the trackers of the job's training.report_to), and whether a team is at its running
limit. service.scheduler decides with them; service.queue_info tells a waiting job's place and reason
with the same ones, and service.tracking refuses at submission a job no live worker could serve, so what
users are told cannot drift from what the scheduler does."""
from __future__ import annotations

import json

from sqlalchemy import ColumnElement, Over, Text, and_, cast, func, literal, or_, select
from sqlalchemy.orm import Session

from dpo_core.reporting import TRACKERS
from service.db.models import ON_WORKER, Job

# Within a team: the highest priority first, then the oldest (the id breaks a tie of the same second).
TEAM_ORDER = (Job.priority.desc(), Job.created_at, Job.id)


def team_rank() -> Over:
    """SQL: a job's 1-based place in its team's queue (TEAM_ORDER) among the jobs the query selects."""
    return func.row_number().over(partition_by=Job.team_id, order_by=TEAM_ORDER)


def serves(gpu_type, gpus, integrations, job_gpu_type=Job.gpu_type, job_gpus=Job.gpus,
           job_report_to=Job.report_to) -> ColumnElement[bool]:
    """SQL: a job that a worker with `gpus` GPUs of type `gpu_type` that can import the trackers
    `integrations` can run: it `fits` the worker's GPUs and the worker `imports` its report_to. Each side
    is a value or a column: the jobs a worker serves (the default), or the workers that serve a job not
    yet stored (`serves(Worker.gpu_type, Worker.gpus, Worker.integrations, literal(...), literal(...),
    report_to)`)."""
    return and_(fits(gpu_type, gpus, job_gpu_type, job_gpus), imports(integrations, job_report_to))


def fits(gpu_type, gpus, job_gpu_type=Job.gpu_type, job_gpus=Job.gpus) -> ColumnElement[bool]:
    """SQL: the job's gpu_type, if it names one, is the worker's, and it asks for no more GPUs than the
    worker has."""
    return and_(or_(job_gpu_type.is_(None), job_gpu_type == gpu_type), job_gpus <= gpus)


def imports(integrations, job_report_to=Job.report_to) -> ColumnElement[bool]:
    """SQL: the worker can import every tracker the job's report_to names. A worker that did not say what
    it has (NULL) counts as able, as at submission (service.tracking); a worker without the package fails
    the job when it starts. Both sides are JSON lists of tracker names (a column, or a list given here,
    None for NULL), matched as text per known tracker (`"mlflow"` in the list's JSON), which SQLite and
    PostgreSQL evaluate alike and which needs neither side unnested."""
    have, want = _as_text(integrations), _as_text(job_report_to)
    quoted = [f'%{json.dumps(name)}%' for name in TRACKERS]
    return or_(have.is_(None), and_(*(or_(~want.like(q), have.like(q)) for q in quoted)))


def _as_text(names) -> ColumnElement[str]:
    """A JSON list of tracker names as SQL text: a column's stored JSON, or a list given here."""
    if names is None or isinstance(names, (list, tuple)):
        return literal(None if names is None else json.dumps(list(names)), Text)
    return cast(names, Text)


def running_by_team(session: Session, team_ids: list[str]) -> dict[str, int]:
    """Each team's jobs that hold a worker (dispatched or running); a team with none is absent."""
    stmt = (select(Job.team_id, func.count()).where(Job.team_id.in_(team_ids),
                                                    Job.status.in_([x.value for x in ON_WORKER]))
            .group_by(Job.team_id))
    return dict(session.execute(stmt).all())


def at_running_limit(max_running_jobs: int | None, running: int) -> bool:
    """Whether a team with this limit (None: none) and this many jobs on workers may start no other."""
    return max_running_jobs is not None and running >= max_running_jobs
