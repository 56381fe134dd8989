"""What teams used: GPU-seconds (the GPUs of each run of a job times the part of the run inside a time
range), jobs and trained tokens. The scheduler ranks teams by the same GPU-seconds over its recent
window. A run is the time a worker held the job (service.db.models.Run), so a job waiting in the queue
between runs (after a lost worker, a hand-back) adds nothing."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, Float, Integer, and_, case, func, literal, literal_column, or_, select
from sqlalchemy.orm import Session

from service.db.models import Job, Run


def _gpu_seconds(since, until):
    """SQL: the GPU-seconds of a run clipped to [since, until]; a run still going counts up to `until`.
    `since` (None: from the beginning) and `until` are numbers or SQL expressions (a bucket's edges)."""
    until_ = until if isinstance(until, ColumnElement) else literal(until, Float)
    if since is not None and not isinstance(since, ColumnElement):
        since = literal(since, Float)
    start = Run.started_at if since is None else case((Run.started_at > since, Run.started_at), else_=since)
    end = func.coalesce(Run.ended_at, until_)
    end = case((end < until_, end), else_=until_)
    overlaps = [Run.started_at < until_]
    if since is not None:
        overlaps.append(or_(Run.ended_at.is_(None), Run.ended_at > since))
    return Run.gpus * (end - start), and_(*overlaps)


def gpu_seconds_by_team(session: Session, team_ids: Iterable[str] | None, since: float | None,
                        until: float) -> dict[str, float]:
    """GPU-seconds per team in [since, until] (since None: from the beginning), summed over the runs of
    its jobs; teams with none are absent. The one definition the scheduler and /v1/usage both use."""
    amount, overlaps = _gpu_seconds(since, until)
    stmt = select(Run.team_id, func.sum(amount)).where(overlaps).group_by(Run.team_id)
    if team_ids is not None:
        stmt = stmt.where(Run.team_id.in_(list(team_ids)))
    return {team: float(total or 0.0) for team, total in session.execute(stmt)}


def gpu_seconds_by_bucket(session: Session, team_ids: Iterable[str] | None, since: float, until: float,
                          bucket: float) -> dict[str, list[float]]:
    """GPU-seconds per team in each bucket of `bucket` seconds from `since` (the last one ends at `until`),
    in one query: the buckets are a recursive CTE joined to the runs they overlap, each run clipped to each
    bucket by _gpu_seconds. Teams with none are absent; the buckets of a team sum to its total over
    [since, until]."""
    count = math.ceil((until - since) / bucket)
    if count <= 0:
        return {}
    steps = select(literal_column("0", Integer).label("i")).cte("buckets", recursive=True)
    steps = steps.union_all(select(steps.c.i + 1).where(steps.c.i < count - 1))
    # Both edges from the bucket's index, so one bucket's end is exactly the next one's start.
    lo = literal(since, Float) + steps.c.i * literal(bucket, Float)
    hi = literal(since, Float) + (steps.c.i + 1) * literal(bucket, Float)
    hi = case((hi < until, hi), else_=literal(until, Float))
    amount, overlaps = _gpu_seconds(lo, hi)
    stmt = (select(Run.team_id, steps.c.i, func.sum(amount)).select_from(steps).join(Run, overlaps)
            .group_by(Run.team_id, steps.c.i))
    if team_ids is not None:
        stmt = stmt.where(Run.team_id.in_(list(team_ids)))
    out: dict[str, list[float]] = {}
    for team, i, total in session.execute(stmt):
        out.setdefault(team, [0.0] * count)[int(i)] = float(total or 0.0)
    return out


@dataclass
class TeamUsage:
    team_id: str
    gpu_seconds: float = 0.0
    trained_tokens: int = 0
    jobs: dict[str, int] = field(default_factory=dict)  # status -> jobs created in the range


def usage_by_team(session: Session, team_ids: list[str] | None, since: float | None, until: float
                  ) -> dict[str, TeamUsage]:
    """Usage per team: GPU-seconds of runs inside the range; jobs and trained tokens of jobs created in it."""
    out: dict[str, TeamUsage] = {}
    for team, seconds in gpu_seconds_by_team(session, team_ids, since, until).items():
        out.setdefault(team, TeamUsage(team)).gpu_seconds = seconds
    stmt = (select(Job.team_id, Job.status, func.count(), func.coalesce(func.sum(Job.trained_tokens), 0))
            .where(Job.created_at <= until).group_by(Job.team_id, Job.status))
    if since is not None:
        stmt = stmt.where(Job.created_at >= since)
    if team_ids is not None:
        stmt = stmt.where(Job.team_id.in_(team_ids))
    for team, status, count, tokens in session.execute(stmt):
        usage = out.setdefault(team, TeamUsage(team))
        usage.jobs[status] = usage.jobs.get(status, 0) + count
        usage.trained_tokens += int(tokens)
    return out
