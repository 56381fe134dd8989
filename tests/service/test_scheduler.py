"""Integration: the fair-share dispatcher on a real database (SQLite, and PostgreSQL when configured),
with workers registered as rows and jobs finished by hand, so each decision is checked exactly."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from sqlalchemy import select, update

from service.db import jobs, leases, teams, workers
from service.db.migrate import upgrade
from service.db.models import Job, JobStatus, Run, Worker, new_id
from service.db.usage import gpu_seconds_by_team
from service.queue_info import Wait, queue_info
from service.reconciler import reconcile
from service.scheduler import dispatch_pass
from tests.service.support import fresh_postgres, make_settings, register_worker, sessions_for


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request, tmp_path):
    if request.param == "sqlite":
        s = make_settings(tmp_path / "data")
        upgrade(s.db_url)
        yield s
        return
    with fresh_postgres() as url:
        upgrade(url)
        yield make_settings(tmp_path / "data", database_url=url)


def team(settings, name, **limits) -> str:
    with sessions_for(settings).begin() as s:
        return teams.create_team(s, name, limits.get("max_running_jobs"), limits.get("max_queued_jobs")).id


_created = iter(range(10**9))


def submit(settings, team_id, n=1, priority=0, gpu_type=None, gpus=1, report_to=()) -> list[str]:
    """Queued jobs as the API stores them, each created one second after the last (age order is certain)."""
    ids = []
    with sessions_for(settings).begin() as s:
        for _ in range(n):
            job = Job(id=new_id("ftjob"), team_id=team_id, status=JobStatus.QUEUED.value, model="m",
                      training_file="file-x", method={}, hyperparameters={}, spec={}, created_at=next(_created),
                      result_files=[], cancel_requested=False, priority=priority, gpu_type=gpu_type, gpus=gpus,
                      report_to=list(report_to))
            s.add(job)
            ids.append(job.id)
    return ids


def run(settings, job_id, seconds: float) -> None:
    """The dispatched job ran for `seconds`, ending now, recorded as its worker records a run."""
    with sessions_for(settings).begin() as s:
        lease = start(s, settings, job_id, time.time() - seconds)
        leases.finish(s, lease, JobStatus.SUCCEEDED)


def start(s, settings, job_id, at: float) -> leases.Lease:
    """The job's worker starts it at `at` (service.db.leases.acquire, as worker.runner does)."""
    worker_id = s.scalar(select(Job.worker_id).where(Job.id == job_id))
    lease = leases.acquire(s, job_id, worker_id, "test-worker", settings.job_lease_s, at=at)
    assert lease is not None
    return lease


def dispatched(settings) -> list[str]:
    return [a.job_id for a in dispatch_pass(sessions_for(settings), settings, lambda a: None)]


def status(settings, job_id) -> tuple[str, str | None]:
    with sessions_for(settings)() as s:
        job = s.get(Job, job_id)
        return job.status, job.worker


def test_the_next_free_worker_goes_to_the_team_that_used_least(settings):
    register_worker(settings)
    a, b = team(settings, "a"), team(settings, "b")
    a_jobs, b_jobs = submit(settings, a, 10), submit(settings, b, 2)
    order = []
    for seconds in (5.0, 3.0, 1.0, 1.0):
        (job,) = dispatched(settings)
        assert dispatched(settings) == []  # one worker, busy
        order.append(job)
        run(settings, job, seconds)
    # A's first (oldest), then B's as soon as A's ends, then B's again (3 s used < A's 5 s), then A's.
    assert order == [a_jobs[0], b_jobs[0], b_jobs[1], a_jobs[1]]


def test_usage_older_than_the_window_does_not_count(settings):
    register_worker(settings)
    a, b = team(settings, "a"), team(settings, "b")
    (old,) = submit(settings, a)
    assert dispatched(settings) == [old]
    with sessions_for(settings).begin() as s:  # a big run of A's, two days ago
        lease = start(s, settings, old, time.time() - 2 * 86400)
        leases.finish(s, lease, JobStatus.SUCCEEDED)
        s.execute(update(Run).where(Run.job_id == old).values(ended_at=time.time() - 2 * 86400 + 7200))
    (a1,) = submit(settings, a)
    (b1,) = submit(settings, b)
    assert dispatched(settings) == [a1]  # A's job is older; its old usage is outside the 24 h window


def test_a_lost_run_stops_counting_when_it_is_lost_and_runs_add_up(settings):
    """A's run is lost (its worker died: the lease ran out) and its job waits queued again: A's GPU-seconds
    are the run's 40 s and stay so while the job waits; B, with 60 s used, does not get the next worker."""
    worker = register_worker(settings)
    a, b = team(settings, "a"), team(settings, "b")
    (b_done,) = submit(settings, b)
    (a_job,) = submit(settings, a, gpus=1)
    (b_next,) = submit(settings, b)
    assert dispatched(settings) == [b_done]
    run(settings, b_done, 60)
    assert dispatched(settings) == [a_job]
    now = time.time()
    with sessions_for(settings).begin() as s:
        lease = start(s, settings, a_job, now - 100)
        leases.hold(s, lease, settings.job_lease_s, at=now - 60)  # its last renewal; then its worker died
        s.execute(update(Worker).where(Worker.id == worker).values(last_heartbeat_at=now - 3600))
    assert reconcile(sessions_for(settings), settings, now) == 1
    assert status(settings, a_job) == ("queued", None)

    def used(until: float) -> dict[str, float]:
        with sessions_for(settings)() as s:
            return gpu_seconds_by_team(s, [a, b], until - settings.fair_share_window_s, until)

    for later in (0, 600, 3600):  # the job waits: nothing grows
        assert used(now + later)[a] == pytest.approx(40, abs=0.5)
    register_worker(settings, "w2", pid=2)
    assert dispatched(settings) == [a_job]  # A used 40 GPU-seconds, B 60: A's job, not B's newer one
    run(settings, a_job, 10)  # its second run
    assert used(time.time())[a] == pytest.approx(50, abs=0.5)
    with sessions_for(settings)() as s:
        runs = s.execute(select(Run.token, Run.attempt, Run.outcome).where(Run.job_id == a_job)
                         .order_by(Run.token)).all()
    assert [tuple(r) for r in runs] == [(1, 1, "lost"), (2, 2, "succeeded")]
    assert b_next


def test_within_a_team_priority_then_age(settings):
    register_worker(settings)
    a = team(settings, "a")
    low, high, low2, high2 = (submit(settings, a, priority=p)[0] for p in (0, 5, 0, 5))
    order = []
    for _ in range(4):
        (job,) = dispatched(settings)
        order.append(job)
        run(settings, job, 1)
    assert order == [high, high2, low, low2]


def test_max_running_jobs_caps_a_team_and_leaves_workers_to_others(settings):
    for i in range(3):
        register_worker(settings, f"w{i}", pid=i)
    a, b = team(settings, "a", max_running_jobs=1), team(settings, "b")
    a_jobs, b_jobs = submit(settings, a, 3), submit(settings, b, 1)
    assert sorted(dispatched(settings)) == sorted([a_jobs[0], b_jobs[0]])
    assert dispatched(settings) == []  # a worker stays idle: A is at its limit, B has nothing left
    run(settings, a_jobs[0], 1)
    assert dispatched(settings) == [a_jobs[1]]


def test_jobs_go_only_to_workers_that_can_serve_them(settings):
    cpu = register_worker(settings, "cpu-1", gpu_type="cpu", gpus=1, pid=1)
    big = register_worker(settings, "h100-8", gpu_type="h100", gpus=8, pid=2)
    small = register_worker(settings, "h100-1", gpu_type="h100", gpus=1, pid=3)
    a = team(settings, "a")
    (wants_a100,) = submit(settings, a, gpu_type="a100")
    (wants_4,) = submit(settings, a, gpu_type="h100", gpus=4)
    (wants_h100,) = submit(settings, a, gpu_type="h100")
    (anything,) = submit(settings, a)
    assert sorted(dispatched(settings)) == sorted([wants_4, wants_h100, anything])
    served_by = {job: status(settings, job)[1] for job in (wants_4, wants_h100, anything)}
    assert served_by == {wants_4: "h100-8", wants_h100: "h100-1", anything: "cpu-1"}
    assert status(settings, wants_a100) == ("queued", None)
    assert {cpu, big, small}


def waiting(settings, job_id):
    """queue_info's answer for one job, as the API shows it."""
    with sessions_for(settings)() as s:
        return queue_info(s, settings, [jobs.job_row(s, job_id)], time.time())[job_id]


def test_a_job_goes_only_to_a_worker_that_can_import_its_trackers(settings):
    """Two live workers, one with mlflow and one without: a job with report_to [mlflow] goes only to the
    one with it, and says why it waits while only the other is free or when no live worker has it."""
    with_mlflow = register_worker(settings, "with-mlflow", pid=1, integrations=["mlflow", "tensorboard"])
    plain = register_worker(settings, "plain", pid=2, integrations=["tensorboard"])
    a = team(settings, "a")
    (filler,) = submit(settings, a)
    assert dispatched(settings) == [filler] and status(settings, filler) == ("dispatched", "with-mlflow")
    (tracked,) = submit(settings, a, report_to=["mlflow"])
    assert dispatched(settings) == []  # only the plain worker is free
    info = waiting(settings, tracked)
    assert info.wait == Wait.FAIR_SHARE and "free worker that can import mlflow" in info.reason
    (board,) = submit(settings, a, report_to=["tensorboard"])
    assert dispatched(settings) == [board] and status(settings, board) == ("dispatched", "plain")
    run(settings, filler, 1)
    assert dispatched(settings) == [tracked] and status(settings, tracked) == ("dispatched", "with-mlflow")
    run(settings, tracked, 1)
    run(settings, board, 1)
    with sessions_for(settings).begin() as s:  # the worker with mlflow is lost: no live worker has it
        s.execute(update(Worker).where(Worker.id == with_mlflow).values(last_heartbeat_at=time.time() - 3600))
    (again,) = submit(settings, a, report_to=["mlflow"])
    assert dispatched(settings) == []
    info = waiting(settings, again)
    assert info.wait == Wait.NO_TRACKER and "mlflow" in info.reason
    with sessions_for(settings).begin() as s:  # a worker that never said what it has counts as able
        s.execute(update(Worker).where(Worker.id == plain).values(integrations=None))
    assert dispatched(settings) == [again] and status(settings, again) == ("dispatched", "plain")


def test_lost_and_stopped_workers_get_nothing_and_give_back_what_they_did_not_start(settings):
    lost = register_worker(settings, "lost", pid=1)
    a = team(settings, "a")
    (job,) = submit(settings, a)
    assert dispatched(settings) == [job]
    with sessions_for(settings).begin() as s:  # its heartbeats stopped long ago
        s.execute(update(Worker).where(Worker.id == lost).values(last_heartbeat_at=time.time() - 3600))
    assert dispatched(settings) == []
    assert status(settings, job) == ("queued", None)
    stopped = register_worker(settings, "stopped", pid=2)
    assert dispatched(settings) == [job]
    with sessions_for(settings).begin() as s:
        workers.mark_stopped(s, stopped)
    assert dispatched(settings) == []
    assert status(settings, job) == ("queued", None)


def test_concurrent_dispatchers_never_dispatch_twice_or_overfill(settings):
    """Several API processes dispatch at once: each job at most once, each worker one job, limits kept."""
    for i in range(4):
        register_worker(settings, f"w{i}", pid=i)
    a, b, c = team(settings, "a", max_running_jobs=1), team(settings, "b"), team(settings, "c")
    for t in (a, b, c):
        submit(settings, t, 4)
    sent, errors = [], []
    barrier = threading.Barrier(4)

    def dispatcher():
        barrier.wait()
        try:
            sent.extend(dispatch_pass(sessions_for(settings), settings, lambda _: time.sleep(0.01)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=dispatcher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    # A dispatcher that lost a race for a team's last running slot leaves that worker to the next pass.
    sent += dispatch_pass(sessions_for(settings), settings, lambda _: None)
    assert len(sent) == 4 and len({x.job_id for x in sent}) == 4 and len({x.worker_id for x in sent}) == 4
    with sessions_for(settings)() as s:
        rows = s.execute(select(Job.team_id, Job.worker_id).where(Job.status == "dispatched")).all()
    assert len(rows) == 4 and Counter(team_id for team_id, _ in rows)[a] == 1
