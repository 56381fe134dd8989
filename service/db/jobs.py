"""Job state changes and the records a job leaves (events, checkpoints), shared by API and worker.

Status changes are conditional updates (`... WHERE status IN (expected)`), so an API cancel and a
worker's start or finish can race without either overwriting the other.
"""
from __future__ import annotations

import time
from typing import Any, TypeAlias

from sqlalchemy import ColumnElement, Row, bindparam, func, select, update
from sqlalchemy.orm import Session

from service.db import webhooks
from service.db.models import TERMINAL, WAITING, Checkpoint, Event, Job, JobStatus, Sample, new_id, now, public_status
from service.errors import Conflict

# Unfinished jobs: their files cannot be deleted, nor their team (a paused job resumes on its files).
ACTIVE = (*WAITING, JobStatus.RUNNING, JobStatus.PAUSED)

# The one shape in which a job is read to be shown: a row of JOB_FIELDS (JobRow), its fields named as
# Job's attributes (`metadata_` included). Every route that answers with jobs reads them so (create, list,
# retrieve, cancel), and JobPublic.of and service.queue_info.queue_info take nothing else. A plain row
# skips the ORM's identity map and object building, on the request clients poll most. Table columns, not
# Job's attributes, keep the statements below plain SQL, which the ORM layer passes straight through.
JOB_FIELDS = tuple(attr.columns[0].label(attr.key) for attr in Job.__mapper__.column_attrs)
JobRow: TypeAlias = Row  # a row of JOB_FIELDS; read-only: changes go through the ORM or `transition`
_JOB_BY_ID = select(*JOB_FIELDS).where(Job.__table__.c.id == bindparam("job_id"))


def job_row(session: Session, job_id: str) -> JobRow | None:
    """Job `job_id` as a JobRow."""
    return session.execute(_JOB_BY_ID, {"job_id": job_id}).one_or_none()


def add_event(
    session: Session, job_id: str, message: str, *, level: str = "info", type: str = "message", data=None
) -> Event:
    """Record an event of job `job_id` (the one place events are written). On PostgreSQL the job's row is
    locked until commit, so one job's events commit in the order of their seq, and a live stream that has
    read up to one never sees an earlier one appear (SQLite commits one writer at a time, in seq order
    already); and the commit notifies the API processes' streams (api.streams) on EVENTS_CHANNEL."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_ANNOUNCE, {"job_id": job_id})
    event = Event(id=new_id("ftevent"), job_id=job_id, message=message, level=level, type=type, data=data,
                  created_at=now())
    session.add(event)
    return event


def add_warning(session: Session, job_id: str, message: str, code: str | None = None,
                data: dict[str, Any] | None = None) -> None:
    """A problem the run survives, as a `warn` event; one with a code (a diagnostic: rewards_both_falling,
    eval_gap, ...) also joins the job's `warnings`, once per code and step (a resumed run may see it again)."""
    add_event(session, job_id, message, level="warn", data={"code": code, **(data or {})} if code else data)
    if code is None:
        return
    listed = session.scalar(select(Job.warnings).where(Job.id == job_id)) or []
    entry = {"code": code, "step": (data or {}).get("step"), "message": message}
    if not any(w.get("code") == code and w.get("step") == entry["step"] for w in listed):
        update_job(session, job_id, warnings=[*listed, entry])


def put_samples(session: Session, job_id: str, step: int, records: list[dict], summary: dict) -> None:
    """A sampling step's completions (training.samples); a step sampled again (a resumed run) replaces its row."""
    found = session.get(Sample, (job_id, step))
    if found is None:
        session.add(Sample(job_id=job_id, step=step, records=records, summary=summary))
    else:
        found.records, found.summary = records, summary


# The PostgreSQL channel on which each commit that adds events names their job, once per transaction.
EVENTS_CHANNEL = "dpo_events"
_ANNOUNCE = (select(func.pg_notify(EVENTS_CHANNEL, Job.id)).where(Job.id == bindparam("job_id"))
             .with_for_update(key_share=True))  # FOR NO KEY UPDATE: what an UPDATE of the job's status takes


def is_final(type: str, data: Any) -> bool:
    """Whether an event is a job's move to a terminal status: nothing is recorded of a job after the
    transaction that writes it (a failure's error event comes before it, in the same transaction)."""
    return type == "message" and isinstance(data, dict) and data.get("status") in _TERMINAL_VALUES


_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


def transition(
    session: Session, job_id: str, new: JobStatus, expected: tuple[JobStatus, ...],
    *, where: tuple[ColumnElement[bool], ...] = (), message: str | None = None, data: dict | None = None,
    **fields: Any,
) -> bool:
    """Move a job to `new` if it is in one of `expected` (and matches `where`); record an event.
    False if it was not. Status changes other than to `dispatched` are status events (`data.status`)."""
    if new.terminal:
        fields.setdefault("finished_at", time.time())
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_([s.value for s in expected]), *where)
        .values(status=new.value, **fields)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    status_event(session, job_id, new, message, data)
    return True


def status_event(session: Session, job_id: str, new: JobStatus, message: str | None = None,
                 data: dict | None = None) -> None:
    """The event of a job's move to `new` (a job is created `queued`, so creating one records it too),
    and, for a terminal status, its webhook deliveries: in the same transaction as the move."""
    level = "error" if new == JobStatus.FAILED else "info"
    data = data if new == JobStatus.DISPATCHED else {"status": new.value, **(data or {})}
    add_event(session, job_id, message or _STATUS_MESSAGES[new], level=level, data=data)
    webhooks.record_status(session, job_id, new)


_STATUS_MESSAGES = {
    JobStatus.QUEUED: "Job queued",
    JobStatus.DISPATCHED: "Job handed to a worker",
    JobStatus.RUNNING: "Job started",
    JobStatus.SUCCEEDED: "The job has successfully completed",
    JobStatus.FAILED: "The job failed",
    JobStatus.CANCELLED: "The job was cancelled",
    JobStatus.PAUSED: "Job paused",
}


def request_cancel(session: Session, job_id: str) -> JobStatus | None:
    """Cancel a job that has not started, or flag a running one for its worker. Returns the new status,
    or None when the job had already finished."""
    # A dispatched job's worker then skips it; a paused one holds no worker.
    if transition(session, job_id, JobStatus.CANCELLED, (*WAITING, JobStatus.PAUSED)):
        return JobStatus.CANCELLED
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:
        add_event(session, job_id, "Cancellation requested; the job stops at its next step",
                  data={"code": "cancel_requested"})
        return JobStatus.RUNNING
    return None


def cancel(session: Session, job_id: str) -> JobStatus:
    """request_cancel, as a user asks it: Conflict (job_finished) when the job had already finished."""
    new = request_cancel(session, job_id)
    if new is None:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        raise Conflict(f"job {job_id} is already {status}; only unfinished jobs can be cancelled",
                       param="fine_tuning_job_id", code="job_finished")
    return new


def pause(session: Session, job_id: str) -> JobStatus:
    """Pause a job: one not started is `paused` at once (a dispatched one's worker then skips it); a running
    one is flagged for its run, which checkpoints at its next step and ends it `paused` (worker.runner);
    a paused one stays so. Conflict when the job has finished or is being cancelled."""
    for _ in range(3):  # a run may hand its job back between two of these conditional updates: look again
        if transition(session, job_id, JobStatus.PAUSED, WAITING, worker_id=None, worker=None, dispatched_at=None,
                      pause_requested=False, data={"code": "paused"}):
            return JobStatus.PAUSED
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, ~Job.cancel_requested,
                   ~Job.pause_requested)
            .values(pause_requested=True)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:
            add_event(session, job_id, "Pause requested; the job checkpoints at its next step and frees its worker",
                      data={"code": "pause_requested"})
            return JobStatus.RUNNING
        row = session.execute(select(Job.status, Job.cancel_requested, Job.pause_requested)
                              .where(Job.id == job_id)).one()
        if row.status == JobStatus.PAUSED:
            return JobStatus.PAUSED
        if row.status == JobStatus.RUNNING and row.cancel_requested:
            raise Conflict(f"job {job_id} is being cancelled; it cannot be paused",
                           param="fine_tuning_job_id", code="job_cancelling")
        if row.status == JobStatus.RUNNING and row.pause_requested:
            return JobStatus.RUNNING  # asked already
        if JobStatus(row.status).terminal:
            raise Conflict(f"job {job_id} is already {row.status}; only unfinished jobs can be paused",
                           param="fine_tuning_job_id", code="job_finished")
    raise Conflict(f"job {job_id} changed status while being paused; try again", param="fine_tuning_job_id")


def resume(session: Session, job_id: str) -> None:
    """Queue a paused job again; its next run goes on from the checkpoint its pause left (if it had run).
    Conflict when the job is not paused."""
    if transition(session, job_id, JobStatus.QUEUED, (JobStatus.PAUSED,), message="Job resumed; queued again",
                  data={"code": "resumed"}):
        return
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    pausing = " (a pause was asked: resume it once it is paused)" if status == JobStatus.RUNNING and \
        session.scalar(select(Job.pause_requested).where(Job.id == job_id)) else ""
    raise Conflict(f"job {job_id} is {public_status(status)}{pausing}; only a paused job can be resumed",
                   param="fine_tuning_job_id", code="job_not_paused")


def cancel_requested(session: Session, job_id: str) -> bool:
    row = session.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).one_or_none()
    return row is None or bool(row.cancel_requested) or row.status == JobStatus.CANCELLED.value


def update_job(session: Session, job_id: str, **fields: Any) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(**fields).execution_options(synchronize_session=False)
    )


def add_checkpoint(
    session: Session, job_id: str, step: int, storage_key: str, metrics: dict | None, final: bool = False,
    size: int = 0, id: str | None = None,
) -> Checkpoint:
    """A checkpoint's row, and its webhook deliveries (checkpoint.created) in the same transaction;
    `size`: its directory's bytes (Storage.size), what counts against the team's quota. `id`: the one the
    worker chose before publishing the directory (its tar's arcname); a new one if None."""
    checkpoint = Checkpoint(
        id=id or new_id("ftckpt"), job_id=job_id, step_number=step, storage_key=storage_key, metrics=metrics, final=final,
        created_at=now(), bytes=size,
    )
    session.add(checkpoint)
    webhooks.record_checkpoint(session, checkpoint)
    return checkpoint
