"""What teams used: GPU-seconds (a job's GPUs times the part of its run inside a time range), jobs and
trained tokens. The scheduler ranks teams by the same GPU-seconds over its recent window."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Float, and_, case, func, literal, or_, select
from sqlalchemy.orm import Session

from api.store.models import Job


def _gpu_seconds(since: float | None, until: float):
    """SQL: the GPU-seconds of a job's run clipped to [since, until]; a running job counts up to `until`."""
    until_ = literal(until, Float)
    start = Job.started_at if since is None else case((Job.started_at > since, Job.started_at),
                                                      else_=literal(since, Float))
    end = func.coalesce(Job.finished_at, until_)
    end = case((end < until_, end), else_=until_)
    overlaps = [Job.started_at.is_not(None), Job.started_at < until_]
    if since is not None:
        overlaps.append(or_(Job.finished_at.is_(None), Job.finished_at > since))
    return Job.gpus * (end - start), and_(*overlaps)


def gpu_seconds_by_team(session: Session, team_ids: Iterable[str] | None, since: float | None,
                        until: float) -> dict[str, float]:
    """GPU-seconds per team in [since, until] (since None: from the beginning); teams with none are absent."""
    amount, overlaps = _gpu_seconds(since, until)
    stmt = select(Job.team_id, func.sum(amount)).where(overlaps).group_by(Job.team_id)
    if team_ids is not None:
        stmt = stmt.where(Job.team_id.in_(list(team_ids)))
    return {team: float(total or 0.0) for team, total in session.execute(stmt)}


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
