"""What `GET /metrics` tells Prometheus about the service, read from the database at scrape time.

`read_snapshot` is a handful of grouped queries on one session (jobs per team and status, the pool's
workers, the run time of finished jobs bucketed in SQL, the latest step time of running jobs);
`ServiceCollector` turns a snapshot into metric families. Every API process reads the same database,
so any of them answers a scrape with the same numbers. The request latency histograms are counted
in the API processes (api.metrics).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.db.models import TERMINAL, WAITING, Job, JobStatus, Run, Team
from service.db.workers import WorkerState, remembered
from service.settings import Settings

# Upper bounds (seconds) of the job run time histogram: from a test-sized job to a three-day run.
JOB_SECONDS_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600, 72 * 3600)


@dataclass
class Snapshot:
    # Teams are labelled by id and name: a deleted team's name may be taken again by a new team.
    names: dict[str, str] = field(default_factory=dict)  # team id -> name, of every team
    live: list[str] = field(default_factory=list)  # ids of the teams not deleted
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (team id, status) -> jobs
    workers: dict[tuple[str, str], int] = field(default_factory=dict)  # (state, gpu_type) -> workers
    # (team id, status) -> (cumulative count per bucket of JOB_SECONDS_BUCKETS, then +Inf; sum of seconds)
    job_seconds: dict[tuple[str, str], tuple[list[int], float]] = field(default_factory=dict)
    running: list[tuple[str, str, float | None, float | None]] = field(default_factory=list)  # job, team id, s/step, tok/s

    def teams(self) -> list[tuple[str, str]]:
        """(id, name) of every live team and every team with jobs, by name."""
        ids = set(self.live) | {t for t, _ in self.jobs}
        return sorted(((t, self.names.get(t, t)) for t in ids), key=lambda pair: (pair[1], pair[0]))

    def name(self, team_id: str) -> str:
        return self.names.get(team_id, team_id)


def read_snapshot(session: Session, settings: Settings, at: float | None = None) -> Snapshot:
    """Everything the service's metrics show, now."""
    at = time.time() if at is None else at
    snap = Snapshot()
    for team_id, name, deleted_at in session.execute(select(Team.id, Team.name, Team.deleted_at)):
        snap.names[team_id] = name
        if deleted_at is None:
            snap.live.append(team_id)
    for team_id, status, count in session.execute(
            select(Job.team_id, Job.status, func.count()).group_by(Job.team_id, Job.status)):
        snap.jobs[(team_id, status)] = count
    for worker, _, state in remembered(session, settings.worker_lost_after_s, settings.worker_forget_after_s, at):
        key = (state.value, worker.gpu_type)
        snap.workers[key] = snap.workers.get(key, 0) + 1
    snap.job_seconds = _job_seconds(session)
    for job_id, team_id, metrics in session.execute(
            select(Job.id, Job.team_id, Job.metrics).where(Job.status == JobStatus.RUNNING.value)):
        metrics = metrics or {}
        snap.running.append((job_id, team_id, metrics.get("step_time_s"),
                             metrics.get("tokens_per_s")))
    return snap


def _job_seconds(session: Session) -> dict[tuple[str, str], tuple[list[int], float]]:
    """Per (team id, status) of finished jobs that ran: how many ran at most each bucket's seconds, and
    the sum. A job's run time is the sum of its runs' lengths (service.db.models.Run), so time queued
    between runs (after a lost worker, a hand-back) does not count. Bucketed in SQL: one row per team and
    status, however many jobs there are."""
    per_job = (select(Run.job_id, func.sum(Run.ended_at - Run.started_at).label("seconds"))
               .where(Run.ended_at.is_not(None)).group_by(Run.job_id).subquery())
    buckets = [func.sum(case((per_job.c.seconds <= bound, 1), else_=0)) for bound in JOB_SECONDS_BUCKETS]
    stmt = (select(Job.team_id, Job.status, func.count(), func.sum(per_job.c.seconds), *buckets)
            .join(per_job, per_job.c.job_id == Job.id)
            .where(Job.status.in_([s.value for s in TERMINAL])).group_by(Job.team_id, Job.status))
    out = {}
    for team_id, status, count, total, *counts in session.execute(stmt):
        out[(team_id, status)] = ([int(c or 0) for c in counts] + [int(count)], float(total or 0.0))
    return out


class ServiceCollector(Collector):
    """Metric families of a Snapshot that `read()` takes when Prometheus scrapes (in the scrape's thread)."""

    def __init__(self, read: Callable[[], Snapshot]):
        self.read = read

    def describe(self) -> list[Metric]:
        return []  # no description without a database read: the registry then skips the duplicate check

    def collect(self) -> Iterator[Metric]:
        snap = self.read()
        yield from (_jobs(snap), _queue(snap), _workers(snap), _job_seconds_family(snap))
        yield from _running(snap)


def _jobs(snap: Snapshot) -> Metric:
    family = GaugeMetricFamily("dpo_jobs", "Jobs by team and status (every job the service has, finished ones "
                               "included)", labels=["team_id", "team", "status"])
    for team_id, name in snap.teams():
        for status in JobStatus:
            family.add_metric([team_id, name, status.value], snap.jobs.get((team_id, status.value), 0))
    return family


def _queue(snap: Snapshot) -> Metric:
    family = GaugeMetricFamily("dpo_queue_depth", "Jobs waiting for a worker (queued or dispatched, not yet "
                               "running), by team", labels=["team_id", "team"])
    for team_id, name in snap.teams():
        family.add_metric([team_id, name], sum(snap.jobs.get((team_id, s.value), 0) for s in WAITING))
    return family


def _workers(snap: Snapshot) -> Metric:
    family = GaugeMetricFamily("dpo_workers", "Workers in the pool by state (as GET /v1/pool tells it) and GPU "
                               "type", labels=["state", "gpu_type"])
    for gpu_type in sorted({g for _, g in snap.workers}):
        for state in WorkerState:
            family.add_metric([state.value, gpu_type], snap.workers.get((state.value, gpu_type), 0))
    return family


def _job_seconds_family(snap: Snapshot) -> Metric:
    family = HistogramMetricFamily("dpo_job_run_seconds", "Run time of finished jobs (the sum of their runs' "
                                   "lengths; queue time excluded), by team and final status",
                                   labels=["team_id", "team", "status"])
    bounds = [_bound(b) for b in JOB_SECONDS_BUCKETS] + ["+Inf"]
    for (team_id, status), (counts, total) in sorted(snap.job_seconds.items()):
        family.add_metric([team_id, snap.name(team_id), status], list(zip(bounds, counts, strict=True)), total)
    return family


def _running(snap: Snapshot) -> Iterator[Metric]:
    step = GaugeMetricFamily("dpo_job_step_seconds", "Mean seconds per optimizer step over a running job's "
                             "latest logging window", labels=["job", "team_id", "team"])
    tokens = GaugeMetricFamily("dpo_job_tokens_per_second", "Tokens per second over a running job's latest "
                               "logging window", labels=["job", "team_id", "team"])
    for job_id, team_id, step_s, tokens_s in sorted(snap.running):
        labels = [job_id, team_id, snap.name(team_id)]
        if _finite(step_s):
            step.add_metric(labels, step_s)
        if _finite(tokens_s):
            tokens.add_metric(labels, tokens_s)
    yield step
    yield tokens


def _bound(seconds: float) -> str:
    return f"{float(seconds)}"  # "60.0": the form prometheus_client writes its own buckets' le in


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
