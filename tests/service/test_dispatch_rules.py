"""The scheduler and queue_info tell one story (service.dispatch_rules). Over many dispatches to live
workers of several shapes, with teams at and under their max_running_jobs: the job the scheduler gives a
worker is, among its team's jobs that worker can serve (GPUs and report_to trackers), the first in
queue_info's positions (position 1 whenever that worker can serve it); never a job of a team queue_info
says is at its limit; and never a job queue_info says no live worker can serve."""
from __future__ import annotations

import random
import time

import pytest
from sqlalchemy import select

from service.db.jobs import JOB_FIELDS
from service.db.migrate import upgrade
from service.db.models import Job, JobStatus
from service.queue_info import Wait, queue_info
from service.scheduler import dispatch_to
from tests.service.support import make_settings, register_worker, sessions_for
from tests.service.test_scheduler import run, submit, team

# gpu_type, gpus, integrations (None: a worker that did not say, able to import any tracker)
WORKERS = [("cpu", 1, None), ("h100", 1, ["mlflow"]), ("h100", 4, []), ("a100", 2, ["mlflow", "wandb"])]
ASKS = [(None, 1), (None, 2), ("h100", 1), ("h100", 4), ("a100", 1), ("a100", 4), ("tpu", 1), ("h100", 8)]
TRACKERS = [[], [], ["mlflow"], ["wandb"], ["mlflow", "wandb"], ["tensorboard"]]


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    s = make_settings(tmp_path / "data", **({"database_url": url} if url else {}))
    upgrade(s.db_url)
    return s


def queued_info(settings) -> tuple[dict, dict]:
    """The queued jobs as rows, and queue_info's answer for them."""
    with sessions_for(settings)() as s:
        rows = s.execute(select(*JOB_FIELDS).where(Job.status == JobStatus.QUEUED.value)).all()
        return {r.id: r for r in rows}, queue_info(s, settings, rows, time.time())


def fits(worker: tuple[str, int, list[str] | None], job) -> bool:
    """The rule as docs/operations.md states it (gpu_type, gpus, report_to), written out here apart from
    the service's SQL."""
    gpu_type, gpus, integrations = worker
    trackers = integrations is None or set(job.report_to) <= set(integrations)
    return job.gpu_type in (None, gpu_type) and job.gpus <= gpus and trackers


def check_dispatch(job_id: str, worker: tuple[str, int, list[str] | None], rows: dict, info: dict) -> None:
    assert info[job_id].wait == Wait.FAIR_SHARE  # never NO_FIT, NO_TRACKER, TEAM_LIMIT or NO_WORKER
    team_id = rows[job_id].team_id
    first = min((info[j].position, j) for j, r in rows.items() if r.team_id == team_id and fits(worker, r))
    assert first[1] == job_id


def test_the_scheduler_dispatches_what_queue_info_shows_first(settings):
    rng = random.Random(17)
    workers = {register_worker(settings, f"w{i}", gpu_type=t, gpus=g, pid=i, integrations=n): (t, g, n)
               for i, (t, g, n) in enumerate(WORKERS)}
    limits = {"a": 1, "b": 2, "c": None}
    for name, limit in limits.items():
        team_id = team(settings, name, max_running_jobs=limit)
        for _ in range(8):
            gpu_type, gpus = rng.choice(ASKS)
            submit(settings, team_id, priority=rng.choice((0, 0, 5)), gpu_type=gpu_type, gpus=gpus,
                   report_to=rng.choice(TRACKERS))
    seen, dispatched = set(), []
    for _ in range(30):
        done = []
        for worker_id in rng.sample(sorted(workers), len(workers)):
            rows, info = queued_info(settings)
            seen |= {i.wait for i in info.values()}
            assignment = dispatch_to(sessions_for(settings), settings, worker_id, time.time())
            if assignment is not None:
                check_dispatch(assignment.job_id, workers[worker_id], rows, info)
                done.append(assignment.job_id)
        if not done:
            break
        for job_id in done:
            run(settings, job_id, rng.uniform(1, 100))  # GPU-seconds: the fair share changes each round
        dispatched += done
    rows, info = queued_info(settings)
    assert dispatched and rows  # jobs ran, and some could not
    # What is left is what no live worker can serve: its GPUs, or (with them) its trackers.
    assert {info[j].wait for j in rows} == {Wait.NO_FIT, Wait.NO_TRACKER}
    assert all(not any(fits(w, rows[j]) for w in WORKERS) for j in rows)
    assert {Wait.NO_FIT, Wait.NO_TRACKER, Wait.TEAM_LIMIT, Wait.FAIR_SHARE} <= seen
