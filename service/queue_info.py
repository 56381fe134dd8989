"""A waiting job's place in its team's queue (`queue_position`) and why it waits (`queue_reason`), told
with the scheduler's own rule (service.dispatch_rules). The decisions themselves are service.scheduler's."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import ColumnElement, false, or_, select
from sqlalchemy.orm import Session

from service.db.jobs import JobRow
from service.db.models import WAITING, Job, JobStatus, Team, Worker
from service.db.workers import is_live
from service.dispatch_rules import at_running_limit, fits, running_by_team, serves, team_rank
from service.settings import Settings

ANY = "any"


class Wait(StrEnum):
    """Why a job waits, as a code (`QueueInfo.reason` says it in words)."""

    STARTING = "starting"  # handed to a worker, which is starting it
    NO_WORKER = "no_worker"  # the pool has no live worker
    NO_FIT = "no_fit"  # no live worker has the GPUs it asks for
    NO_TRACKER = "no_tracker"  # live workers have its GPUs, but none can import every tracker of its report_to
    TEAM_LIMIT = "team_limit"  # its team is at its max_running_jobs
    FAIR_SHARE = "fair_share"  # its turn comes with a free worker


@dataclass(frozen=True)
class QueueInfo:
    position: int | None  # 1: the team's next job to start; 0: handed to a worker, starting
    reason: str
    wait: Wait


def queue_info(session: Session, settings: Settings, jobs: list[JobRow], at: float) -> dict[str, QueueInfo]:
    """Position and reason for each waiting job among `jobs` (others are absent)."""
    waiting = [j for j in jobs if j.status in WAITING]
    if not waiting:
        return {}
    live = list(session.scalars(select(Worker).where(is_live(settings.worker_lost_after_s, at))))
    queued = _queued(session, {j.team_id for j in waiting if j.status == JobStatus.QUEUED}, live)
    teams = {t.id: t for t in session.scalars(select(Team).where(Team.id.in_({j.team_id for j in waiting})))}
    running = running_by_team(session, list(teams))
    out = {}
    for job in waiting:
        if job.status == JobStatus.DISPATCHED:
            out[job.id] = QueueInfo(0, f"handed to worker {job.worker}; starting", Wait.STARTING)
            continue
        # A job no longer queued by now was taken by a worker that serves it (or cancelled).
        position, fitting, servable = queued.get(job.id, (None, True, True))
        team = teams[job.team_id]
        out[job.id] = _waiting(job, position, (fitting, servable), live, team, running.get(team.id, 0))
    return out


def _waiting(job: JobRow, position: int | None, served: tuple[bool, bool], live: list[Worker], team: Team,
             running: int) -> QueueInfo:
    """`served`: whether a live worker fits its GPUs, and whether one can serve it (also its report_to)."""
    fitting, servable = served
    if not live:
        return QueueInfo(position, "no live worker in the pool; the job waits until one registers", Wait.NO_WORKER)
    if not fitting:
        asked = f"{job.gpus} GPU{'s' if job.gpus > 1 else ''} of type {job.gpu_type or ANY}"
        pool = ", ".join(f"{n} x {t} ({g} GPUs)" for (t, g), n in sorted(Counter((w.gpu_type, w.gpus)
                                                                                   for w in live).items()))
        return QueueInfo(position, f"no live worker can serve it: it asks for {asked}; the pool has {pool}",
                         Wait.NO_FIT)
    if not servable:
        return QueueInfo(position, f"no live worker that has its GPUs can import every tracker of its report_to "
                         f"({', '.join(job.report_to)}); it waits until one that can registers (install the "
                         "trackers on a worker, or cancel it and submit it without them)", Wait.NO_TRACKER)
    if at_running_limit(team.max_running_jobs, running):
        return QueueInfo(position, f"team {team.name} is at its max_running_jobs ({team.max_running_jobs}); it "
                         "starts when one ends", Wait.TEAM_LIMIT)
    ahead = (position or 1) - 1
    worker = f"a free worker that can import {', '.join(job.report_to)}" if job.report_to else "a free worker"
    return QueueInfo(position, f"waiting for {worker} (fair share across teams); {ahead} of the team's jobs "
                     "ahead of it", Wait.FAIR_SHARE)


def _queued(session: Session, team_ids: set[str], live: list[Worker]) -> dict[str, tuple[int, bool, bool]]:
    """Every queued job of these teams: its 1-based place in its team's queue, whether a live worker has
    its GPUs, and whether a live worker can serve it."""
    if not team_ids:
        return {}
    rows = session.execute(select(Job.id, team_rank(), _fit_by(live), _served_by(live)).where(
        Job.team_id.in_(team_ids), Job.status == JobStatus.QUEUED.value))
    return {job_id: (position, bool(fitting), bool(servable)) for job_id, position, fitting, servable in rows}


def _fit_by(workers: list[Worker]) -> ColumnElement[bool]:
    """SQL: a job whose GPUs one of `workers` has."""
    shapes = sorted({(w.gpu_type, w.gpus) for w in workers})
    return or_(*(fits(gpu_type, gpus) for gpu_type, gpus in shapes)) if shapes else false()


def _served_by(workers: list[Worker]) -> ColumnElement[bool]:
    """SQL: a job one of `workers` can serve."""
    shapes = {(w.gpu_type, w.gpus, None if w.integrations is None else tuple(sorted(w.integrations)))
              for w in workers}
    return or_(*(serves(*shape) for shape in sorted(shapes, key=repr))) if shapes else false()
