"""Fair-share scheduling: which queued job the next free worker runs.

For each idle live worker: among the teams with a queued job that worker can serve (its `gpu_type`, if
the job names one, at least the job's `gpus`, and every tracker of the job's training.report_to among
the worker's integrations, see service.dispatch_rules.serves) and that are below their `max_running_jobs`, the
team that used the fewest GPU-seconds over the last `fair_share_window_s` gets the worker (ties: the
team whose waiting job is oldest); within that team the job with the highest `priority`, then the
oldest. The job becomes `dispatched` to that worker in the database, and only then is its id sent to
the worker's own queue.

Several API processes may run this at once. Each decision is one transaction that locks, in this
order, the worker's row (`FOR UPDATE SKIP LOCKED`: another process takes another worker), the chosen
team's row (its running jobs are counted under the lock) and the job's row (a conditional update from
`queued`). So no job is dispatched twice, no worker gets two jobs and no team exceeds its limit.
On SQLite the database's single writer lock serializes the decisions instead.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Select, exists, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import jobs
from service.db.locks import lock_team, try_lock_worker
from service.db.models import ON_WORKER, Job, JobStatus, Team, Worker
from service.db.usage import gpu_seconds_by_team
from service.db.workers import is_live
from service.dispatch_rules import at_running_limit, running_by_team, serves, team_rank
from service.reconciler import reconcile
from service.settings import Settings

log = logging.getLogger("dpo.scheduler")


@dataclass(frozen=True)
class Assignment:
    job_id: str
    worker_id: str
    worker_name: str
    queue: str


@dataclass(frozen=True)
class Candidate:
    job_id: str
    team_id: str
    created_at: int


def dispatch_pass(sessions: sessionmaker[Session], settings: Settings, send: Callable[[Assignment], None],
                  at: float | None = None, dispatch: bool = True) -> list[Assignment]:
    """Repair what faults left (service.reconciler), then (unless `dispatch` is False: the broker is down and
    the caller backs off) give every idle worker a job if one waits; returns what was sent. A send that
    fails puts its job back to `queued` and ends the pass (the next pass tries again)."""
    at = time.time() if at is None else at
    reconcile(sessions, settings, at)
    if not dispatch:
        return []
    with sessions() as s:
        if not s.scalar(select(exists().where(Job.status == JobStatus.QUEUED.value))):
            return []
        idle = [w.id for w in s.scalars(_idle_workers(settings, at))]
    sent = []
    for worker_id in idle:
        assignment = dispatch_to(sessions, settings, worker_id, at)
        if assignment is None:
            continue
        try:
            send(assignment)
        except Exception as err:  # noqa: BLE001 - any failure to publish means "not sent": undo and retry later
            log.warning("could not send job %s to %s: %s", assignment.job_id, assignment.queue, err)
            _undo(sessions, assignment, f"The job could not be sent to worker {assignment.worker_name} "
                  f"(broker unreachable: {type(err).__name__}); it waits for the next dispatch")
            break
        sent.append(assignment)
    return sent


def dispatch_to(sessions: sessionmaker[Session], settings: Settings, worker_id: str, at: float) -> Assignment | None:
    """One decision, one transaction: the job this worker runs next, now `dispatched` to it (or None)."""
    with sessions.begin() as s:
        if not try_lock_worker(s, worker_id):
            return None  # another API process is dispatching to it
        worker = s.scalars(select(Worker).where(Worker.id == worker_id, is_live(settings.worker_lost_after_s, at),
                                                ~_busy(Worker.id))).one_or_none()
        if worker is None:
            return None
        for _ in range(3):  # a job another process took in the meantime: choose again
            chosen = _choose(s, settings, worker, at)
            if chosen is None:
                return None
            message = f"Dispatched to worker {worker.name} ({worker.gpu_type} x{worker.gpus})"
            if jobs.transition(s, chosen.job_id, JobStatus.DISPATCHED, (JobStatus.QUEUED,), message=message,
                                data={"code": "dispatched", "worker": worker.name}, worker_id=worker.id,
                                worker=worker.name, dispatched_at=at):
                return Assignment(chosen.job_id, worker.id, worker.name, worker.queue)
        return None


def _choose(s: Session, settings: Settings, worker: Worker, at: float) -> Candidate | None:
    """The fair-share pick for `worker`, with its team locked and below its running limit."""
    candidates = best_per_team(s, worker.gpu_type, worker.gpus, worker.integrations)
    if not candidates:
        return None
    used = gpu_seconds_by_team(s, [c.team_id for c in candidates], at - settings.fair_share_window_s, at)
    running = running_by_team(s, [c.team_id for c in candidates])
    limits = dict(s.execute(select(Team.id, Team.max_running_jobs).where(
        Team.id.in_([c.team_id for c in candidates]))).all())
    ranked = sorted(candidates, key=lambda c: (used.get(c.team_id, 0.0), c.created_at, c.job_id))
    for c in ranked:
        if at_running_limit(limits.get(c.team_id), running.get(c.team_id, 0)):
            continue
        team = lock_team(s, c.team_id)  # count again under the lock: another process may have just dispatched
        if team is None:
            return None
        if at_running_limit(team.max_running_jobs, running_by_team(s, [team.id]).get(team.id, 0)):
            return None  # lost that race; keep one team lock per transaction and let the next pass retry
        return c
    return None


def best_per_team(s: Session, gpu_type: str, gpus: int, integrations: list[str] | None) -> list[Candidate]:
    """Each team's next queued job (the first in its queue's order) among those a worker like this can serve."""
    fits = select(Job.id, Job.team_id, Job.created_at, team_rank().label("rank")).where(
        Job.status == JobStatus.QUEUED.value, serves(gpu_type, gpus, integrations)).subquery()
    rows = s.execute(select(fits.c.id, fits.c.team_id, fits.c.created_at).where(fits.c.rank == 1))
    return [Candidate(job_id, team_id, created_at) for job_id, team_id, created_at in rows]


def _busy(worker_id):
    return exists().where(Job.worker_id == worker_id, Job.status.in_([x.value for x in ON_WORKER]))


def _idle_workers(settings: Settings, at: float) -> Select:
    # Smallest first, so a job that fits anywhere leaves the big machines to the jobs that need them.
    return (select(Worker).where(is_live(settings.worker_lost_after_s, at), ~_busy(Worker.id))
            .order_by(Worker.gpus, Worker.registered_at, Worker.id))


def _undo(sessions: sessionmaker[Session], a: Assignment, message: str) -> None:
    with sessions.begin() as s:
        jobs.transition(s, a.job_id, JobStatus.QUEUED, (JobStatus.DISPATCHED,), where=(Job.worker_id == a.worker_id,),
                         message=message, data={"code": "send_failed", "worker": a.worker_name}, worker_id=None,
                         worker=None, dispatched_at=None)
