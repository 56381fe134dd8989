"""Leases: which run of a job may write for it.

A worker that starts a dispatched job takes its lease: the job's `lease_token` goes up by one (the
fencing token of this run) and `lease_expires_at` is set `lease_s` ahead. The run renews the lease
while it lives (a heartbeat thread in the job's process, and every write it makes), and every write it
makes (progress, metrics, events, checkpoints, the final status) first checks, in the same
transaction, that the job is still `running` under its token. A run whose worker was lost, whose job
was queued again and started elsewhere, or that was cancelled finds another token or status there:
its writes are refused (`LeaseLost`), so a stale worker never overwrites the run that owns the job.

The check is an UPDATE of the job's row, so on PostgreSQL it holds the row lock until the write
commits (the reconciler's conditional update waits for it), and on SQLite the database's one writer
lock does the same.

Each run is a row of `runs` (service.db.models.Run), opened by `acquire` and closed by `end_run`, the
one way a run ends: a finish, a hand-back, or the reconciler taking back a lost run. GPU-seconds
(service.db.usage) count only the time between the two.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db.jobs import add_event, transition
from service.db.models import Job, JobStatus, Run, RunOutcome
from service.errors import LeaseLost


@dataclass(frozen=True)
class Lease:
    """What a run holds: its job, its fencing token, its worker."""

    job_id: str
    token: int
    worker_id: str
    attempt: int = 1


def acquire(session: Session, job_id: str, worker_id: str, worker_name: str, lease_s: float,
            at: float | None = None) -> Lease | None:
    """Start a job dispatched to this worker: `running`, a new token, one more attempt. None when the job
    is not dispatched to this worker (a duplicate or re-delivered message, a cancelled job, one given
    back to the queue and dispatched elsewhere)."""
    at = time.time() if at is None else at
    row = session.execute(select(Job.team_id, Job.gpus, Job.lease_token, Job.attempts, Job.max_attempts).where(
        Job.id == job_id, Job.status == JobStatus.DISPATCHED.value, Job.worker_id == worker_id)).one_or_none()
    if row is None:
        return None
    token, attempt = row.lease_token + 1, row.attempts + 1
    message = "Job started" + (f" (attempt {attempt} of {row.max_attempts})" if attempt > 1 else "")
    started = transition(session, job_id, JobStatus.RUNNING, (JobStatus.DISPATCHED,), message=message,
                         where=(Job.worker_id == worker_id, Job.lease_token == row.lease_token),
                         data={"worker": worker_name, "attempt": attempt},
                         lease_token=token, lease_expires_at=at + lease_s, attempts=attempt, started_at=at,
                         handback_requested=False, pause_requested=False)
    if not started:
        return None
    session.add(Run(job_id=job_id, team_id=row.team_id, gpus=row.gpus, token=token, attempt=attempt,
                    worker=worker_name, started_at=at))
    return Lease(job_id, token, worker_id, attempt)


def hold(session: Session, lease: Lease, lease_s: float, at: float | None = None) -> None:
    """Check, inside the transaction about to write for `lease`'s run, that the run still owns its job,
    and extend the lease; raise LeaseLost when it does not."""
    at = time.time() if at is None else at
    result = session.execute(
        update(Job).where(Job.id == lease.job_id, Job.lease_token == lease.token,
                          Job.status == JobStatus.RUNNING.value)
        .values(lease_expires_at=at + lease_s).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        raise LeaseLost(f"job {lease.job_id} is no longer held by run {lease.token} of it")


def end_run(session: Session, job_id: str, token: int, new: JobStatus, outcome: RunOutcome, *,
            ended_at: float | None = None, where: tuple = (), message: str | None = None, data: dict | None = None,
            **fields) -> bool:
    """End run `token` of a job: move the job from `running` to `new` (if it is still running under that
    token and matches `where`) and close the run's row at `ended_at` (default now) with `outcome`. False
    when the job was not moved. Every way a run ends goes through here, so no run stays open."""
    moved = transition(session, job_id, new, (JobStatus.RUNNING,), where=(Job.lease_token == token, *where),
                       message=message, data=data, lease_expires_at=None, **fields)
    if moved:
        session.execute(update(Run).where(Run.job_id == job_id, Run.token == token, Run.ended_at.is_(None))
                        .values(ended_at=time.time() if ended_at is None else ended_at, outcome=outcome.value)
                        .execution_options(synchronize_session=False))
    return moved


def finish(session: Session, lease: Lease, new: JobStatus, *, outcome: RunOutcome | None = None,
           message: str | None = None, data: dict | None = None, **fields) -> None:
    """Move the run's job from `running` to `new` under its token (LeaseLost if another run owns it).
    The run ends as `outcome`, by default the job's new status."""
    outcome = outcome or RunOutcome(new.value)
    if not end_run(session, lease.job_id, lease.token, new, outcome, message=message, data=data, **fields):
        raise LeaseLost(f"job {lease.job_id} is no longer held by run {lease.token} of it")


def hand_back(session: Session, lease: Lease, worker_name: str, step: int | None, *, paused: bool = False) -> None:
    """The run stopped after a checkpoint (at `step`) and frees its worker: the job goes back to the queue
    (its worker is shutting down) or, `paused`, waits for its team to resume it. This run does not count
    as an attempt."""
    where = f"after a checkpoint at step {step}" if step else "before its first step"
    requeued = dict(outcome=RunOutcome.HANDED_BACK, worker_id=None, worker=None, dispatched_at=None,
                    handback_requested=False, pause_requested=False, attempts=Job.attempts - 1, estimated_finish=None)
    if paused:
        finish(session, lease, JobStatus.PAUSED, **requeued,
               message=f"Job paused {where}; worker {worker_name} is free. Resume it to go on from there",
               data={"code": "paused", "worker": worker_name, "step": step})
        return
    finish(session, lease, JobStatus.QUEUED, **requeued,
           message=f"Worker {worker_name} is shutting down; it handed the job back to the queue {where}",
           data={"code": "handed_back", "handed_back": True, "worker": worker_name, "step": step})


def request_handback(session: Session, worker_id: str) -> list[str]:
    """Ask the runs on this worker to checkpoint at their next step and hand their jobs back."""
    asked = []
    for job_id in session.scalars(select(Job.id).where(Job.worker_id == worker_id,
                                                        Job.status == JobStatus.RUNNING.value)).all():
        result = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                                 .values(handback_requested=True).execution_options(synchronize_session=False))
        if result.rowcount == 1:
            add_event(session, job_id, "Its worker is shutting down; the job checkpoints at its next step "
                                       "and goes back to the queue", data={"code": "handback_requested"})
            asked.append(job_id)
    return asked
