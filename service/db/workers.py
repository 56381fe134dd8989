"""The pool's workers in the database: registration, heartbeats, a clean stop, and how the service
tells an idle worker from a busy, lost or stopped one. Shared by the worker (which writes its own row)
and the API (the dispatcher and the pool view read them).

A worker is *lost* when its last heartbeat is older than `worker_lost_after_s`, *stopped* when it said
goodbye, *busy* while a job is dispatched to it or running on it, and *idle* otherwise.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session

from service.broker import worker_queue
from service.db.models import ON_WORKER, Job, Worker, new_id
from service.errors import Conflict


class WorkerState(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    LOST = "lost"
    STOPPED = "stopped"


def is_live(lost_after_s: float, at: float) -> ColumnElement[bool]:
    """SQL: the worker has not stopped and has sent a heartbeat recently."""
    return and_(Worker.stopped_at.is_(None), Worker.last_heartbeat_at >= at - lost_after_s)


def state_of(worker: Worker, busy: bool, lost_after_s: float, at: float) -> WorkerState:
    if worker.stopped_at is not None:
        return WorkerState.STOPPED
    if worker.last_heartbeat_at < at - lost_after_s:
        return WorkerState.LOST
    return WorkerState.BUSY if busy else WorkerState.IDLE


def remembered(session: Session, lost_after_s: float, forget_after_s: float, at: float
               ) -> list[tuple[Worker, Job | None, WorkerState]]:
    """Every worker the pool still remembers (a heartbeat within `forget_after_s`), by name, with the job
    it holds and its state: what the pool view and the metrics export both show."""
    workers = list(session.scalars(select(Worker).where(Worker.last_heartbeat_at >= at - forget_after_s)
                                   .order_by(Worker.name)))
    busy = current_jobs(session, [w.id for w in workers])
    return [(w, busy.get(w.id), state_of(w, w.id in busy, lost_after_s, at)) for w in workers]


def current_jobs(session: Session, worker_ids: list[str] | None = None) -> dict[str, Job]:
    """Worker id -> the job dispatched to it or running on it."""
    stmt = select(Job).where(Job.status.in_([s.value for s in ON_WORKER]), Job.worker_id.is_not(None))
    if worker_ids is not None:
        stmt = stmt.where(Job.worker_id.in_(worker_ids))
    return {job.worker_id: job for job in session.scalars(stmt)}


def dead_holder(session: Session, name: str, hostname: str, gone: Callable[[int, float], bool]) -> str | None:
    """The id of the worker named `name` when it did not stop cleanly and its process, on this host, is
    gone (`gone(pid, registered_at)`, which only this host can tell); None otherwise. Its row is locked."""
    worker = session.scalars(select(Worker).where(Worker.name == name).with_for_update()).one_or_none()
    if worker is None or worker.stopped_at is not None or worker.hostname != hostname:
        return None
    return worker.id if gone(worker.pid, worker.registered_at) else None


def register(session: Session, *, name: str, gpu_type: str, gpus: int, queue_prefix: str, hostname: str,
             pid: int, lost_after_s: float, holder_dead: bool = False, integrations: list[str] | None = None,
             memory_bytes: int | None = None) -> Worker:
    """Add this worker to the pool, or take over its row when it restarts under the same name.
    Refused while another live process holds the name, unless the caller knows that process is dead
    (`holder_dead`, see dead_holder). `integrations`: the trackers it can import (service.tracking).
    `memory_bytes`: one of its GPUs' memory (a CPU worker: its RAM), what estimates check a job against."""
    at = time.time()
    worker = session.scalars(select(Worker).where(Worker.name == name).with_for_update()).one_or_none()
    if worker is None:
        worker = Worker(id=new_id("worker"), name=name)
        session.add(worker)
    elif worker.stopped_at is None and worker.last_heartbeat_at >= at - lost_after_s and not holder_dead and \
            (worker.hostname, worker.pid) != (hostname, pid):
        raise Conflict(f"a worker named {name!r} is alive on {worker.hostname} (pid {worker.pid}); "
                       "give this one another DPO_WORKER_NAME, or stop that one first", param="worker_name")
    worker.gpu_type, worker.gpus, worker.hostname, worker.pid = gpu_type, gpus, hostname, pid
    worker.integrations = integrations
    worker.memory_bytes = memory_bytes
    worker.queue = worker_queue(queue_prefix, worker.id)
    worker.registered_at = worker.last_heartbeat_at = at
    worker.stopped_at = None
    return worker


def heartbeat(session: Session, worker_id: str) -> bool:
    """Record that the worker is alive; False if its row is gone or it was marked stopped."""
    result = session.execute(update(Worker).where(Worker.id == worker_id, Worker.stopped_at.is_(None))
                             .values(last_heartbeat_at=time.time()).execution_options(synchronize_session=False))
    return result.rowcount == 1


def mark_stopped(session: Session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=time.time())
                    .execution_options(synchronize_session=False))
