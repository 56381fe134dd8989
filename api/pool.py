"""Read-side views of the pool: each waiting job's place in its team's queue and why it waits, and the
pool as `GET /v1/pool` shows it. The decisions themselves are api.scheduler's."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.auth import Principal
from api.schemas.pool import GpuTypeQueue, PoolPublic, TeamQueue, WorkerPublic
from api.settings import Settings
from api.store.models import ON_WORKER, WAITING, Job, JobStatus, Team, Worker
from api.store.workers import WorkerState, current_jobs, is_live, state_of

ANY = "any"


@dataclass(frozen=True)
class QueueInfo:
    position: int | None  # 1: the team's next job to start; 0: handed to a worker, starting
    reason: str | None


def queue_info(session: Session, settings: Settings, jobs: list[Job], at: float) -> dict[str, QueueInfo]:
    """Position and reason for each waiting job among `jobs` (others are absent)."""
    waiting = [j for j in jobs if j.status in (JobStatus.QUEUED, JobStatus.VALIDATING_FILES, JobStatus.DISPATCHED)]
    if not waiting:
        return {}
    positions = _positions(session, {j.team_id for j in waiting if j.status == JobStatus.QUEUED})
    live = list(session.scalars(select(Worker).where(is_live(settings.worker_lost_after_s, at))))
    teams = {t.id: t for t in session.scalars(select(Team).where(Team.id.in_({j.team_id for j in waiting})))}
    running = dict(session.execute(select(Job.team_id, func.count()).where(
        Job.team_id.in_(list(teams)), Job.status.in_([s.value for s in ON_WORKER])).group_by(Job.team_id)).all())
    out = {}
    for job in waiting:
        if job.status == JobStatus.DISPATCHED:
            out[job.id] = QueueInfo(0, f"handed to worker {job.worker}; starting")
        elif job.status == JobStatus.VALIDATING_FILES:
            out[job.id] = QueueInfo(None, "validating its files")
        else:
            position = positions.get(job.id)
            out[job.id] = QueueInfo(position, _reason(job, position, live, teams[job.team_id], running))
    return out


def _reason(job: Job, position: int | None, live: list[Worker], team: Team, running: dict[str, int]) -> str:
    if not live:
        return "no live worker in the pool; the job waits until one registers"
    if not any(_serves(w, job) for w in live):
        asked = f"{job.gpus} GPU{'s' if job.gpus > 1 else ''} of type {job.gpu_type or ANY}"
        pool = ", ".join(f"{n} x {t} ({g} GPUs)" for (t, g), n in sorted(Counter((w.gpu_type, w.gpus)
                                                                                   for w in live).items()))
        return f"no live worker can serve it: it asks for {asked}; the pool has {pool}"
    if team.max_running_jobs is not None and running.get(team.id, 0) >= team.max_running_jobs:
        return f"team {team.name} is at its max_running_jobs ({team.max_running_jobs}); it starts when one ends"
    ahead = (position or 1) - 1
    return f"waiting for a free worker (fair share across teams); {ahead} of the team's jobs ahead of it"


def _serves(worker: Worker, job: Job) -> bool:
    return (job.gpu_type is None or job.gpu_type == worker.gpu_type) and job.gpus <= worker.gpus


def _positions(session: Session, team_ids: set[str]) -> dict[str, int]:
    """1-based place of every queued job in its team's queue: priority (higher first), then age."""
    if not team_ids:
        return {}
    rows = session.execute(select(Job.id, Job.team_id).where(
        Job.team_id.in_(team_ids), Job.status == JobStatus.QUEUED.value
    ).order_by(Job.team_id, Job.priority.desc(), Job.created_at, Job.id))
    seen: Counter[str] = Counter()
    out = {}
    for job_id, team_id in rows:
        seen[team_id] += 1
        out[job_id] = seen[team_id]
    return out


def pool_view(session: Session, settings: Settings, principal: Principal, at: float) -> PoolPublic:
    """Every worker the pool still remembers, and the queues; a team key sees only its own team's jobs."""
    workers = list(session.scalars(select(Worker).where(
        Worker.last_heartbeat_at >= at - settings.worker_forget_after_s).order_by(Worker.name)))
    busy = current_jobs(session, [w.id for w in workers])
    shown = [_worker(w, busy.get(w.id), principal, settings, at) for w in workers]
    jobs = list(session.execute(select(Job.team_id, Job.status, Job.gpu_type, Job.gpus).where(
        Job.status.in_([s.value for s in (*WAITING, JobStatus.RUNNING)]))))
    mine = [j for j in jobs if principal.may_see(j.team_id)]
    return PoolPublic(at=at, lost_after_s=settings.worker_lost_after_s, workers=shown,
                      queued=sum(1 for j in mine if j.status != JobStatus.RUNNING),
                      by_team=_by_team(session, mine), by_gpu_type=_by_gpu_type(jobs, workers, shown))


def _worker(w: Worker, job: Job | None, principal: Principal, settings: Settings, at: float) -> WorkerPublic:
    state = state_of(w, job is not None, settings.worker_lost_after_s, at)
    job_id = job.id if job is not None and principal.may_see(job.team_id) else None
    return WorkerPublic(id=w.id, name=w.name, hostname=w.hostname, gpu_type=w.gpu_type, gpus=w.gpus, state=state,
                        job=job_id, registered_at=int(w.registered_at), last_heartbeat_at=w.last_heartbeat_at,
                        seconds_since_heartbeat=round(max(0.0, at - w.last_heartbeat_at), 3))


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
