"""/v1/pool: the workers (idle, busy, lost, stopped) and the queue depth per team and per GPU type."""
from __future__ import annotations

import time
from collections import Counter

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import CurrentPrincipal, SessionDep, SettingsDep
from api.schemas.pool import GpuTypeQueue, PoolPublic, TeamQueue, WorkerPublic
from service.auth import Principal
from service.db.models import WAITING, Job, JobStatus, Team, Worker
from service.db.workers import WorkerState, remembered
from service.queue_info import ANY
from service.settings import Settings

router = APIRouter(tags=["pool"])


@router.get("/pool", response_model=PoolPublic)
def get_pool(session: SessionDep, settings: SettingsDep, principal: CurrentPrincipal) -> PoolPublic:
    """The pool now. A team key sees every worker but only its own team's jobs and queue."""
    return pool_view(session, settings, principal, time.time())


def pool_view(session: Session, settings: Settings, principal: Principal, at: float) -> PoolPublic:
    """Every worker the pool still remembers, and the queues; a team key sees only its own team's jobs."""
    pool = remembered(session, settings.worker_lost_after_s, settings.worker_forget_after_s, at)
    workers = [w for w, _, _ in pool]
    shown = [_worker(w, job, state, principal, at) for w, job, state in pool]
    jobs = list(session.execute(select(Job.team_id, Job.status, Job.gpu_type, Job.gpus).where(
        Job.status.in_([s.value for s in (*WAITING, JobStatus.RUNNING)]))))
    mine = [j for j in jobs if principal.may_see(j.team_id)]
    return PoolPublic(at=at, lost_after_s=settings.worker_lost_after_s, workers=shown,
                      queued=sum(1 for j in mine if j.status != JobStatus.RUNNING),
                      by_team=_by_team(session, mine), by_gpu_type=_by_gpu_type(jobs, workers, shown))


def _worker(w: Worker, job: Job | None, state: WorkerState, principal: Principal, at: float) -> WorkerPublic:
    job_id = job.id if job is not None and principal.may_see(job.team_id) else None
    return WorkerPublic(id=w.id, name=w.name, hostname=w.hostname, gpu_type=w.gpu_type, gpus=w.gpus, state=state,
                        job=job_id, registered_at=int(w.registered_at), last_heartbeat_at=w.last_heartbeat_at,
                        seconds_since_heartbeat=round(max(0.0, at - w.last_heartbeat_at), 3),
                        integrations=w.integrations)


def _by_team(session: Session, jobs: list) -> list[TeamQueue]:
    queued = Counter(j.team_id for j in jobs if j.status != JobStatus.RUNNING)
    running = Counter(j.team_id for j in jobs if j.status == JobStatus.RUNNING)
    names = dict(session.execute(select(Team.id, Team.name).where(Team.id.in_(set(queued) | set(running)))).all())
    return [TeamQueue(team_id=t, team=names.get(t, t), queued=queued[t], running=running[t]) for t in sorted(names)]


def _by_gpu_type(jobs: list, workers: list[Worker], shown: list[WorkerPublic]) -> list[GpuTypeQueue]:
    """Queue depth per GPU type the jobs ask for, with the live workers that can take them."""
    states = {w.id: p.state for w, p in zip(workers, shown, strict=True)}
    live = (WorkerState.IDLE, WorkerState.BUSY)
    types = sorted({j.gpu_type or ANY for j in jobs} | {w.gpu_type for w in workers if states[w.id] in live})
    out = []
    for t in types:
        serving = [w for w in workers if t in (ANY, w.gpu_type)]
        out.append(GpuTypeQueue(
            gpu_type=t, queued=sum(1 for j in jobs if (j.gpu_type or ANY) == t and j.status != JobStatus.RUNNING),
            running=sum(1 for j in jobs if (j.gpu_type or ANY) == t and j.status == JobStatus.RUNNING),
            idle_workers=sum(1 for w in serving if states[w.id] == WorkerState.IDLE),
            busy_workers=sum(1 for w in serving if states[w.id] == WorkerState.BUSY)))
    return out
