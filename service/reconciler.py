"""The reconciler: puts the database right where a process or a message went away. It runs at the start
of every dispatch pass (service.scheduler), in every API process; each repair is one conditional update,
so several processes running it at once repair each thing once.

- A `running` job whose lease ran out (its worker was killed, lost its machine, or cannot reach the
  database) goes back to `queued` and resumes from its latest checkpoint on the next free worker; after
  `max_attempts` lost runs it fails with `worker_lost`; a job being cancelled is cancelled, one being
  paused is paused (its resume goes on from that latest checkpoint). Its run ends
  (`lost`) at its last renewal of the lease, the last time it was known to run: its team's GPU-seconds
  stop there, however long the job then waits.
- A `dispatched` job whose worker was lost or stopped before starting it goes back to `queued`.
- A worker restarted under its name on the same host, whose old process is known dead (worker.membership),
  has its jobs repaired at once, as above, without waiting for the lease: `requeue_from_dead_worker`.
- A `dispatched` job its worker has not started within `dispatch_timeout_s` goes back to `queued`: its
  message was lost (a broker restarted without its data, an API process died between recording a
  dispatch and sending it). The next pass sends it again. A late copy of the old message is harmless:
  a worker starts only a job dispatched to it (service.db.leases.acquire).
"""
from __future__ import annotations

import logging

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.jobs import transition
from service.db.leases import end_run
from service.db.models import Job, JobStatus, RunOutcome, Worker
from service.db.workers import is_live
from service.settings import Settings

log = logging.getLogger("dpo.reconciler")
REQUEUED = dict(worker_id=None, worker=None, dispatched_at=None)


def reconcile(sessions: sessionmaker[Session], settings: Settings, at: float) -> int:
    """Run every repair once; returns how many jobs changed."""
    return (reclaim_expired_leases(sessions, settings, at) + requeue_from_gone_workers(sessions, settings, at)
            + requeue_stale_dispatches(sessions, settings, at))


def _expired(at: float):
    # No lease at all on a running job: a job from before leases existed; its run cannot renew one.
    return or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < at)


# What _reclaim reads of a running job.
_RUN = (Job.id, Job.lease_token, Job.lease_expires_at, Job.started_at, Job.attempts, Job.max_attempts,
        Job.cancel_requested, Job.pause_requested, Job.worker, Job.step)


def reclaim_expired_leases(sessions: sessionmaker[Session], settings: Settings, at: float) -> int:
    """Running jobs whose run stopped renewing its lease: queued again, failed, or cancelled."""
    with sessions() as s:
        rows = s.execute(select(*_RUN).where(Job.status == JobStatus.RUNNING.value, _expired(at))).all()
    changed = 0
    for row in rows:
        with sessions.begin() as s:
            changed += _reclaim(s, row, settings, at)
    return changed


def requeue_from_dead_worker(s: Session, settings: Settings, worker_id: str, at: float) -> list[str]:
    """A new process took over the name of worker `worker_id` on its host, where the old process is known
    dead: each run it held is lost now, as a run whose lease ran out is (an attempt used, resumed from
    its latest checkpoint), and each job dispatched to it goes back to the queue. In the caller's
    transaction; returns the jobs changed."""
    changed = []
    for row in s.execute(select(*_RUN).where(Job.worker_id == worker_id, Job.status == JobStatus.RUNNING.value)):
        if _reclaim(s, row, settings, at, lost=f"worker {row.worker} died (a new process took its name over)"):
            changed.append(row.id)
    for job_id, name in s.execute(select(Job.id, Job.worker).where(Job.worker_id == worker_id,
                                                                   Job.status == JobStatus.DISPATCHED.value)).all():
        if _requeue_dispatched(s, job_id, name):
            changed.append(job_id)
    return changed


def _reclaim(s: Session, row, settings: Settings, at: float, lost: str | None = None) -> bool:
    """The run `row` is lost: its lease ran out (`lost` None: only while it still has), or `lost` says how
    it is known dead."""
    end = dict(ended_at=_last_renewal(row, settings, at), where=(_expired(at),) if lost is None else ())
    data = {"code": "worker_lost", "cause": "lease_expired" if lost is None else "worker_restarted",
            "worker": row.worker, "step": row.step, "attempts": row.attempts, "max_attempts": row.max_attempts}
    lost = lost or f"worker {row.worker} stopped renewing the job's lease (for {settings.job_lease_s:g}s)"
    step = f" at step {row.step}" if row.step else ""
    if row.cancel_requested:
        return end_run(s, row.id, row.lease_token, JobStatus.CANCELLED, RunOutcome.LOST, **end,
                       message=f"The job was cancelled ({lost} while it was stopping)", data=data)
    if row.pause_requested:  # the lost run counts as an attempt; its team resumes the job when it wants
        return end_run(s, row.id, row.lease_token, JobStatus.PAUSED, RunOutcome.LOST, **end,
                       message=f"Job paused ({lost}{step} while it was pausing); resuming it goes on from its "
                               "latest checkpoint", data=data, pause_requested=False, handback_requested=False,
                       estimated_finish=None, **REQUEUED)
    if row.attempts >= row.max_attempts:
        message = (f"{lost}{step}, and the job has lost {row.attempts} of its {row.max_attempts} attempts this way; "
                   "it is not retried. Look for what kills its workers (memory, preemption), then resubmit it")
        log.warning("job %s failed: %s", row.id, message)
        return end_run(s, row.id, row.lease_token, JobStatus.FAILED, RunOutcome.LOST, **end, message=message,
                       data=data, error_code="worker_lost", error_message=message,
                       estimated_finish=None)
    log.warning("job %s: %s; queued again", row.id, lost)
    return end_run(s, row.id, row.lease_token, JobStatus.QUEUED, RunOutcome.LOST, **end,
                   message=f"Worker lost: {lost}{step}. The job is queued again and resumes from its latest "
                           f"checkpoint ({row.attempts} of {row.max_attempts} attempts used)",
                   data=data, handback_requested=False, estimated_finish=None, **REQUEUED)


def _last_renewal(row, settings: Settings, at: float) -> float:
    """When a lost run last renewed its lease (the lease ran `job_lease_s` from then): the last time it was
    known to run. Within [its start, now]; now for a job that never had a lease."""
    if row.lease_expires_at is None:
        return at
    return max(row.started_at or 0.0, min(at, row.lease_expires_at - settings.job_lease_s))


def requeue_from_gone_workers(sessions: sessionmaker[Session], settings: Settings, at: float) -> int:
    """Jobs dispatched to a worker that was lost or stopped before it started them go back to `queued`."""
    with sessions() as s:
        stranded = s.execute(select(Job.id, Worker.name).join(Worker, Worker.id == Job.worker_id).where(
            Job.status == JobStatus.DISPATCHED.value, ~is_live(settings.worker_lost_after_s, at))).all()
    changed = 0
    for job_id, name in stranded:
        with sessions.begin() as s:
            changed += _requeue_dispatched(s, job_id, name)
    return changed


def _requeue_dispatched(s: Session, job_id: str, name: str) -> bool:
    return transition(s, job_id, JobStatus.QUEUED, (JobStatus.DISPATCHED,),
                      message=f"Worker {name} left before it started the job; queued again",
                      data={"code": "worker_left", "worker": name}, **REQUEUED)


def requeue_stale_dispatches(sessions: sessionmaker[Session], settings: Settings, at: float) -> int:
    """Jobs a live worker has not started within dispatch_timeout_s of their dispatch: the message was lost."""
    with sessions() as s:
        stale = s.execute(select(Job.id, Job.worker, Job.dispatched_at).where(
            Job.status == JobStatus.DISPATCHED.value,
            Job.dispatched_at < at - settings.dispatch_timeout_s)).all()
    changed = 0
    for job_id, name, dispatched_at in stale:
        with sessions.begin() as s:
            changed += transition(
                s, job_id, JobStatus.QUEUED, (JobStatus.DISPATCHED,), where=(Job.dispatched_at == dispatched_at,),
                message=f"Worker {name} did not start the job within {settings.dispatch_timeout_s:g}s of its "
                        "dispatch (its message was lost); queued again to be sent once more",
                data={"code": "dispatch_timeout", "worker": name}, **REQUEUED)
    return changed
