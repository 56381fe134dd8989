"""When a job not yet submitted would start: the scheduler's rule (service.scheduler) played forward.

Each live worker that can serve the job frees up when its current job ends (that job's
`estimated_finish`, from its measured step time, or its pre-flight estimate). Whenever a worker frees
up it takes, as the scheduler does, the head of the queue of the team that used the fewest GPU-seconds
in the fair-share window, within a team the highest priority then the oldest job; a job's run adds its
expected seconds to its team's use. A job's expected seconds are its pre-flight estimate's, or, for a
job submitted without one, the mean measured run time of recent jobs. A team's max_running_jobs is not
played forward: the start told is the earliest the pool allows.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from statistics import mean
from typing import Any

from sqlalchemy import Integer, String, literal, select
from sqlalchemy.orm import Session

from service.db.models import ON_WORKER, Job, JobStatus, Worker
from service.db.usage import gpu_seconds_by_team
from service.db.workers import is_live
from service.dispatch_rules import serves
from service.settings import Settings

# Jobs played forward at most; a queue longer than this gives no start time.
MAX_PLAYED = 5000
# A job submitted without a pre-flight estimate, with no measured runs to go by.
UNKNOWN_RUN_S = 600.0


@dataclass
class _Queued:
    id: str
    team_id: str
    priority: int
    created_at: float
    gpus: int
    seconds: float


def forecast(session: Session, settings: Settings, job: Job, chosen: dict[str, Any] | None,
             at: float) -> dict[str, Any]:
    """{position, jobs_ahead, estimated_start_at, estimated_start_in_s, reason} for `job` (not stored),
    whose run is expected to take `chosen["seconds"]`."""
    own_s = (chosen or {}).get("seconds") or UNKNOWN_RUN_S
    workers = serving_workers(session, settings, job, at)
    queued = _queued(session, job, _fallback_seconds(session, own_s))
    mine = _Queued(job.id, job.team_id, job.priority, at, job.gpus, own_s)
    position = 1 + sum(1 for q in queued if q.team_id == job.team_id and q.priority >= job.priority)
    if not workers:
        return {"position": position, "jobs_ahead": None, "estimated_start_at": None, "estimated_start_in_s": None,
                "reason": "no live worker can serve it (its gpu_type, gpus and report_to); it would wait until "
                          "one registers"}
    free = [(_free_at(session, w, at, own_s), w.id) for w in workers]
    used = gpu_seconds_by_team(session, list({q.team_id for q in queued} | {job.team_id}),
                               at - settings.fair_share_window_s, at)
    start, ahead = _play(free, [*queued, mine], used, mine)
    if start is None:
        return {"position": position, "jobs_ahead": None, "estimated_start_at": None, "estimated_start_in_s": None,
                "reason": f"more than {MAX_PLAYED} jobs wait for these workers; no start time is told"}
    able = f"{len(workers)} live worker{'s' * (len(workers) != 1)} can run it"
    if start <= at:
        reason = f"{able}, and one is free now"
    else:
        reason = (f"{able}; {ahead} job{'s' * (ahead != 1)} (of all teams) would start before it, in the "
                  "fair-share order, and the running jobs end first")
    return {"position": position, "jobs_ahead": ahead, "estimated_start_at": int(start),
            "estimated_start_in_s": round(start - at, 1), "reason": reason}


def serving_workers(session: Session, settings: Settings, job: Job, at: float) -> list[Worker]:
    """The live workers that could run `job` (not stored): service.dispatch_rules.serves, the scheduler's rule."""
    can = serves(Worker.gpu_type, Worker.gpus, Worker.integrations, literal(job.gpu_type, String),
                 literal(job.gpus, Integer), list(job.report_to or []))
    return list(session.scalars(select(Worker).where(is_live(settings.worker_lost_after_s, at), can)))


def _queued(session: Session, job: Job, default_s: float) -> list[_Queued]:
    rows = session.execute(select(Job.id, Job.team_id, Job.priority, Job.created_at, Job.gpus, Job.gpu_type,
                                  Job.estimate).where(Job.status == JobStatus.QUEUED.value)).all()
    return [_Queued(r.id, r.team_id, r.priority, r.created_at, r.gpus, _seconds(r.estimate, default_s))
            for r in rows if job.gpu_type is None or r.gpu_type in (None, job.gpu_type)]


def _seconds(estimate: dict | None, default_s: float) -> float:
    value = (estimate or {}).get("seconds")
    return float(value) if isinstance(value, int | float) and value > 0 else default_s


def _fallback_seconds(session: Session, own_s: float) -> float:
    """A run's expected seconds when its job has no estimate: the mean of recent measured runs."""
    measured = session.scalars(select(Job.measured).where(Job.measured.is_not(None))
                               .order_by(Job.finished_at.desc()).limit(50)).all()
    runs = [m["train_seconds"] for m in measured if isinstance(m, dict) and m.get("train_seconds")]
    return mean(runs) if runs else own_s


def _free_at(session: Session, w: Worker, at: float, default_s: float) -> float:
    """When worker `w` finishes the job it holds (now, if none)."""
    held = session.execute(select(Job.estimated_finish, Job.started_at, Job.estimate).where(
        Job.worker_id == w.id, Job.status.in_([s.value for s in ON_WORKER]))).first()
    if held is None:
        return at
    if held.estimated_finish:
        return max(at, float(held.estimated_finish))
    return max(at, (held.started_at or at) + _seconds(held.estimate, default_s))


def _play(free: list[tuple[float, str]], queued: list[_Queued], used: dict[str, float],
          mine: _Queued) -> tuple[float | None, int]:
    """(when `mine` starts, how many jobs start before it), giving each freed worker the fair-share pick."""
    heapq.heapify(free)
    queues: dict[str, list[_Queued]] = {}
    for q in sorted(queued, key=lambda q: (-q.priority, q.created_at, q.id)):
        queues.setdefault(q.team_id, []).append(q)
    used = dict(used)
    for ahead in range(MAX_PLAYED):
        when, worker = heapq.heappop(free)
        team = min(queues, key=lambda t: (used.get(t, 0.0), queues[t][0].created_at, queues[t][0].id))
        job = queues[team].pop(0)
        if job is mine:
            return when, ahead
        if not queues[team]:
            del queues[team]
        used[team] = used.get(team, 0.0) + job.seconds * job.gpus
        heapq.heappush(free, (when + job.seconds, worker))
    return None, MAX_PLAYED
