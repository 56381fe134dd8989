"""A waiting job's place in its team's queue (`queue_position`) and why it waits (`queue_reason`).
The decisions themselves are service.scheduler's."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import ON_WORKER, WAITING, Job, JobStatus, Team, Worker
from service.db.workers import is_live
from service.settings import Settings

ANY = "any"


@dataclass(frozen=True)
class QueueInfo:
    position: int | None  # 1: the team's next job to start; 0: handed to a worker, starting
    reason: str | None


def queue_info(session: Session, settings: Settings, jobs: list[Job], at: float) -> dict[str, QueueInfo]:
    """Position and reason for each waiting job among `jobs` (others are absent)."""
    waiting = [j for j in jobs if j.status in WAITING]
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
