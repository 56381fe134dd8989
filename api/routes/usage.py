"""/v1/usage (the caller's team) and /v1/admin/usage (every team): GPU-seconds, jobs, trained tokens, storage."""
from __future__ import annotations

import math
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from api.deps import CurrentPrincipal, SessionDep, SettingsDep, get_admin
from api.schemas.pool import JobCounts, UsageBucket, UsageListPublic, UsagePublic
from service.db.models import WAITING, JobStatus, Team
from service.db.quota import bytes_used, storage_limit
from service.db.usage import TeamUsage, gpu_seconds_by_bucket, gpu_seconds_by_team, usage_by_team
from service.errors import InvalidInput

router = APIRouter(tags=["usage"])
Since = Annotated[float | None, Query(ge=0, le=1e12, description="Unix seconds; default: from the beginning")]
Until = Annotated[float | None, Query(ge=0, le=1e12, description="Unix seconds; default: now")]
MIN_BUCKET_S, MAX_BUCKETS = 60, 500
Bucket = Annotated[float | None, Query(ge=MIN_BUCKET_S, le=1e12, description=(
    f"seconds: also return gpu_seconds per bucket of this length from since to until (needs since; at most "
    f"{MAX_BUCKETS} buckets)"))]


@router.get("/usage", response_model=UsagePublic)
def team_usage(session: SessionDep, settings: SettingsDep, principal: CurrentPrincipal, since: Since = None,
               until: Until = None, bucket: Bucket = None) -> UsagePublic:
    """The caller's team's usage (the admin key's: the default team's); with `bucket`, over time too."""
    team = session.get(Team, principal.team_id)
    return _report(session, settings, [team], since, until, bucket)[0]


@router.get("/admin/usage", response_model=UsageListPublic, dependencies=[Depends(get_admin)])
def all_usage(session: SessionDep, settings: SettingsDep, since: Since = None, until: Until = None,
              bucket: Bucket = None) -> UsageListPublic:
    """Every team's usage, deleted teams included (their jobs still count); with `bucket`, over time too."""
    teams = list(session.scalars(select(Team).order_by(Team.created_at, Team.id)))
    return UsageListPublic(data=_report(session, settings, teams, since, until, bucket))


def _report(session, settings, teams: list[Team], since: float | None, until: float | None,
            bucket: float | None) -> list[UsagePublic]:
    at = time.time()
    until = at if until is None else until
    if since is not None and since > until:
        raise InvalidInput("since must not be after until", param="since")
    ids = [t.id for t in teams]
    buckets = _buckets(session, ids, since, until, bucket) if bucket is not None else None
    usage = usage_by_team(session, ids, since, until)
    window = gpu_seconds_by_team(session, ids, at - settings.fair_share_window_s, at)
    reports = [_public(t, usage.get(t.id, TeamUsage(t.id)), since, until, window.get(t.id, 0.0),
                       settings.fair_share_window_s) for t in teams]
    stored = bytes_used(session, ids)
    for report, team in zip(reports, teams):
        report.storage_bytes, report.storage_limit_bytes = stored[team.id], storage_limit(team, settings)
        report.buckets = buckets(team.id) if buckets else None
    return reports


def _buckets(session, ids: list[str], since: float | None, until: float, bucket: float):
    """team id -> its UsageBucket list, from one query (service.db.usage.gpu_seconds_by_bucket)."""
    if since is None:
        raise InvalidInput("bucket needs since: pass the start of the range to divide", param="bucket")
    count = math.ceil((until - since) / bucket)
    if count > MAX_BUCKETS:
        raise InvalidInput(f"{count} buckets of {bucket:g} s from since to until; at most {MAX_BUCKETS}: pass a "
                           f"larger bucket or a shorter range", param="bucket")
    by_team = gpu_seconds_by_bucket(session, ids, since, until, bucket)
    edges = [(since + i * bucket, min(since + (i + 1) * bucket, until)) for i in range(count)]
    return lambda team_id: [UsageBucket(start=lo, end=hi, gpu_seconds=round(s, 3)) for (lo, hi), s in
                            zip(edges, by_team.get(team_id, [0.0] * count), strict=True)]


def _public(team: Team, u: TeamUsage, since, until, window_seconds: float, window_s: float) -> UsagePublic:
    jobs = dict(u.jobs)
    jobs[JobStatus.QUEUED] = sum(jobs.pop(s, 0) for s in WAITING)
    counts = JobCounts(total=sum(jobs.values()), **{str(k): v for k, v in jobs.items()})
    return UsagePublic(team_id=team.id, team=team.name, since=since, until=until, gpu_seconds=round(u.gpu_seconds, 3),
                       jobs=counts, trained_tokens=u.trained_tokens,
                       fair_share_gpu_seconds=round(window_seconds, 3), fair_share_window_s=window_s)
