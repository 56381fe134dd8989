"""Integration: leases, fencing tokens and the reconciler on a real database (SQLite, and PostgreSQL when
configured), with jobs and workers as rows and time moved by hand, so each fault is exact: a lost
worker's job is queued again or fails at max_attempts, a stale run's late writes are refused, a
duplicate message starts nothing, a lost message is sent again."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select, update

from service.db import jobs, leases
from service.db.migrate import upgrade
from service.db.models import DEFAULT_TEAM_ID, Checkpoint, Event, Job, JobStatus, Run, new_id
from service.errors import LeaseLost
from service.reconciler import reconcile
from service.scheduler import dispatch_pass, dispatch_to
from tests.service.support import fresh_postgres, make_settings, register_worker, sessions_for
from worker.lease import LeaseKeeper

LEASE_S = 5.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request, tmp_path):
    overrides = dict(job_lease_s=LEASE_S, dispatch_timeout_s=30, worker_heartbeat_interval_s=0.2,
                     worker_lost_after_s=120)
    if request.param == "sqlite":
        s = make_settings(tmp_path / "data", **overrides)
        upgrade(s.db_url)
        yield s
        return
    with fresh_postgres() as url:
        upgrade(url)
        yield make_settings(tmp_path / "data", database_url=url, **overrides)


def submit(settings, max_attempts: int = 3) -> str:
    with sessions_for(settings).begin() as s:
        job = Job(id=new_id("ftjob"), team_id=DEFAULT_TEAM_ID, status=JobStatus.QUEUED.value, model="m",
                  training_file="file-x", method={}, hyperparameters={}, spec={}, created_at=int(time.time()),
                  result_files=[], cancel_requested=False, max_attempts=max_attempts)
        s.add(job)
        return job.id


def dispatch(settings) -> list[str]:
    return [a.job_id for a in dispatch_pass(sessions_for(settings), settings, lambda a: None)]


def start(settings, job_id, worker_id, name="w1") -> leases.Lease | None:
    with sessions_for(settings).begin() as s:
        return leases.acquire(s, job_id, worker_id, name, settings.job_lease_s)


def job(settings, job_id) -> Job:
    with sessions_for(settings)() as s:
        return s.get(Job, job_id)


def events(settings, job_id) -> list[Event]:
    with sessions_for(settings)() as s:
        return list(s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq)))


def runs(settings, job_id) -> list[tuple[int, int, str | None, bool]]:
    """(token, attempt, outcome, ended) of each run of the job."""
    with sessions_for(settings)() as s:
        rows = s.execute(select(Run.token, Run.attempt, Run.outcome, Run.ended_at).where(Run.job_id == job_id)
                         .order_by(Run.token)).all()
    return [(r.token, r.attempt, r.outcome, r.ended_at is not None) for r in rows]


def expire(settings, job_id) -> float:
    """The job's lease ran out (its run stopped renewing it); returns a time after that."""
    with sessions_for(settings).begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=time.time() - 1))
    return time.time()


def test_a_lost_run_is_queued_again_then_fails_at_max_attempts(settings):
    w1 = register_worker(settings, "w1")
    job_id = submit(settings, max_attempts=2)
    assert dispatch(settings) == [job_id]
    first = start(settings, job_id, w1)
    assert (first.token, first.attempt) == (1, 1)
    assert job(settings, job_id).lease_expires_at == pytest.approx(time.time() + LEASE_S, abs=2)

    assert reconcile(sessions_for(settings), settings, time.time()) == 0  # the lease is fresh: nothing to do
    assert reconcile(sessions_for(settings), settings, expire(settings, job_id)) == 1
    row = job(settings, job_id)
    assert (row.status, row.worker_id, row.attempts, row.lease_expires_at) == ("queued", None, 1, None)
    lost = {"code": "worker_lost", "cause": "lease_expired", "worker": "w1", "step": None, "max_attempts": 2}
    assert events(settings, job_id)[-1].data == {"status": "queued", **lost, "attempts": 1}

    assert dispatch(settings) == [job_id]  # w1 is idle again (its job left it)
    second = start(settings, job_id, w1)
    assert (second.token, second.attempt) == (2, 2)
    assert events(settings, job_id)[-1].data == {"status": "running", "worker": "w1", "attempt": 2}
    reconcile(sessions_for(settings), settings, expire(settings, job_id))
    row = job(settings, job_id)
    assert (row.status, row.error_code, row.attempts) == ("failed", "worker_lost", 2)
    assert events(settings, job_id)[-1].data == {"status": "failed", **lost, "attempts": 2}
    assert "w1" in row.error_message
    assert dispatch(settings) == []
    assert runs(settings, job_id) == [(1, 1, "lost", True), (2, 2, "lost", True)]


def test_a_stale_runs_late_writes_are_refused(settings):
    """Run 1 loses its lease; the job is queued again and run 2 starts. Everything run 1 still tries to
    write (a status, progress, an event, a checkpoint) is refused, and nothing of it lands."""
    w1, w2 = register_worker(settings, "w1", pid=1), register_worker(settings, "w2", pid=2)
    job_id = submit(settings)
    dispatch(settings)
    worker_of_run1 = job(settings, job_id).worker_id
    stale = start(settings, job_id, worker_of_run1)
    reconcile(sessions_for(settings), settings, expire(settings, job_id))
    dispatch(settings)
    current = start(settings, job_id, job(settings, job_id).worker_id, "w2")
    assert current is not None and current.token == stale.token + 1 and {w1, w2}
    before = len(events(settings, job_id))

    sessions = sessions_for(settings)
    for write in (lambda s: leases.finish(s, stale, JobStatus.SUCCEEDED, fine_tuned_model="ftckpt-stale"),
                  lambda s: leases.hold(s, stale, LEASE_S)):
        with pytest.raises(LeaseLost), sessions.begin() as s:
            write(s)
    keeper = LeaseKeeper(sessions, stale, LEASE_S, 0.1)
    with pytest.raises(LeaseLost), sessions.begin() as s:  # a recorder's write: fence, then the rows
        keeper.hold(s)
        jobs.update_job(s, job_id, step=999)
        jobs.add_event(s, job_id, "stale metrics")
        jobs.add_checkpoint(s, job_id, 999, f"jobs/{job_id}/checkpoint-999", None)
    assert keeper.lost

    row = job(settings, job_id)
    assert (row.status, row.step, row.fine_tuned_model, row.lease_token) == ("running", None, None, current.token)
    assert len(events(settings, job_id)) == before
    with sessions() as s:
        assert s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all() == []
    with sessions.begin() as s:  # the current run writes as usual
        leases.hold(s, current, LEASE_S)
        leases.finish(s, current, JobStatus.SUCCEEDED)
    assert job(settings, job_id).status == "succeeded"
    assert runs(settings, job_id) == [(1, 1, "lost", True), (2, 2, "succeeded", True)]  # run 1's end untouched


def test_a_duplicate_or_redelivered_message_starts_nothing(settings):
    w1, w2 = register_worker(settings, "w1", pid=1), register_worker(settings, "w2", pid=2)
    job_id = submit(settings)
    dispatch(settings)
    mine = job(settings, job_id).worker_id
    other = w2 if mine == w1 else w1
    assert start(settings, job_id, other) is None  # a message that reached the wrong worker
    assert start(settings, job_id, mine).token == 1
    assert start(settings, job_id, mine) is None  # the same message again (Redis re-delivery)
    row = job(settings, job_id)
    assert (row.status, row.lease_token, row.attempts) == ("running", 1, 1)
    assert [e.data.get("status") for e in events(settings, job_id) if e.data].count("running") == 1


def test_cancelling_a_job_whose_worker_is_lost_ends_it_cancelled(settings):
    w1 = register_worker(settings, "w1")
    job_id = submit(settings)
    dispatch(settings)
    start(settings, job_id, w1)
    with sessions_for(settings).begin() as s:
        assert jobs.request_cancel(s, job_id) == JobStatus.RUNNING
    reconcile(sessions_for(settings), settings, expire(settings, job_id))
    assert job(settings, job_id).status == "cancelled"
    last = events(settings, job_id)[-1].data
    assert (last["status"], last["code"], last["cause"]) == ("cancelled", "worker_lost", "lease_expired")
    assert runs(settings, job_id) == [(1, 1, "lost", True)]


def test_a_lost_message_is_sent_again(settings):
    """A dispatch was recorded but its message never arrived (the API died before sending it, or the
    broker lost it): after dispatch_timeout_s the job is queued again and the next pass sends it."""
    w1 = register_worker(settings, "w1")
    job_id = submit(settings)
    at = time.time()
    assert dispatch_to(sessions_for(settings), settings, w1, at).job_id == job_id  # recorded, never sent
    assert dispatch_pass(sessions_for(settings), settings, lambda a: None, at=at + 1) == []  # w1 counts as busy
    resent = []
    late = at + settings.dispatch_timeout_s + 1  # w1 is alive all along (lost only after 120 s)
    dispatch_pass(sessions_for(settings), settings, resent.append, at=late)
    assert [a.job_id for a in resent] == [job_id]
    requeued = {"status": "queued", "code": "dispatch_timeout", "worker": "w1"}
    assert requeued in [e.data for e in events(settings, job_id)]
    assert start(settings, job_id, w1) is not None


def test_a_hand_back_requeues_without_using_an_attempt(settings):
    w1 = register_worker(settings, "w1")
    job_id = submit(settings)
    dispatch(settings)
    lease = start(settings, job_id, w1)
    with sessions_for(settings).begin() as s:
        assert leases.request_handback(s, w1) == [job_id]
    assert job(settings, job_id).handback_requested
    with sessions_for(settings).begin() as s:
        leases.hand_back(s, lease, "w1", 7)
    row = job(settings, job_id)
    assert (row.status, row.attempts, row.worker_id, row.handback_requested) == ("queued", 0, None, False)
    assert runs(settings, job_id) == [(1, 1, "handed_back", True)]
    assert events(settings, job_id)[-1].data == {"status": "queued", "code": "handed_back", "handed_back": True,
                                                 "worker": "w1", "step": 7}


def test_the_keeper_renews_and_notices_a_lost_lease(settings):
    w1 = register_worker(settings, "w1")
    job_id = submit(settings)
    dispatch(settings)
    lease = start(settings, job_id, w1)
    keeper = LeaseKeeper(sessions_for(settings), lease, LEASE_S, 0.1)
    keeper.start()
    try:
        first = job(settings, job_id).lease_expires_at
        deadline = time.monotonic() + 30  # renewals every 0.1 s: the first one, however loaded the machine
        while job(settings, job_id).lease_expires_at <= first:
            assert time.monotonic() < deadline, "the keeper never renewed the lease"
            time.sleep(0.05)
        assert not keeper.lost
        with sessions_for(settings).begin() as s:  # another run took the job over
            s.execute(update(Job).where(Job.id == job_id).values(lease_token=lease.token + 1))
        deadline = time.monotonic() + 30
        while not keeper.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert keeper.lost
    finally:
        keeper.stop()
    # A keeper that could not renew for a whole lease period counts itself lost (the database was away).
    silent = LeaseKeeper(sessions_for(settings), lease, 0.2, 10)
    time.sleep(0.3)
    assert silent.lost


@pytest.fixture
def outage(tmp_path):
    """Settings on a PostgreSQL of the test's own, which the test stops and starts."""
    from tests.service.processes import PostgresServer
    from tests.service.support import dispose_engine

    pg = PostgresServer().init()
    try:
        upgrade(pg.url)
        yield pg, make_settings(tmp_path / "data", database_url=pg.url, job_lease_s=3, dispatch_timeout_s=30,
                                worker_heartbeat_interval_s=0.2, worker_lost_after_s=120)
    finally:
        dispose_engine(pg.url)
        pg.remove()


@pytest.mark.slow
def test_writes_held_through_a_database_outage_land_in_order_and_only_under_the_lease(outage):
    """A run's writes while its database is down are held and land in order once it is back; once the
    outage outlasts the lease, nothing held lands."""
    pg, settings = outage
    worker_id, job_id = register_worker(settings, "w1"), submit(settings)
    assert dispatch(settings) == [job_id]
    lease = start(settings, job_id, worker_id)
    keeper = LeaseKeeper(sessions_for(settings), lease, settings.job_lease_s, 0.2)

    def event(message):
        keeper.write(lambda s: jobs.add_event(s, job_id, message))

    event("before")
    pg.stop()
    for i in range(3):
        event(f"held {i}")  # returns at once: the write is held
    pg.start()
    event("after")
    keeper.drain()
    assert [e.message for e in events(settings, job_id)][-5:] == ["before", "held 0", "held 1", "held 2", "after"]

    pg.stop()
    event("stale")
    deadline = time.monotonic() + 2 * settings.job_lease_s
    while not keeper.lost:  # a whole lease period without a renewal
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pg.start()
    assert reconcile(sessions_for(settings), settings, time.time()) == 1  # the job is given away
    with pytest.raises(LeaseLost):
        keeper.drain()
    assert "stale" not in [e.message for e in events(settings, job_id)]
    assert job(settings, job_id).status == "queued"


@pytest.mark.slow
def test_a_job_process_starting_its_job_waits_out_a_database_outage(outage):
    import threading

    from worker.runner import JobRunner

    pg, settings = outage
    worker_id, job_id = register_worker(settings, "w1"), submit(settings)
    assert dispatch(settings) == [job_id]
    runner = JobRunner(settings, worker_id)
    runner.sessions = sessions_for(settings)
    pg.stop()
    back = threading.Timer(1.5, pg.start)
    back.start()
    try:
        lease = runner._start(job_id)  # tried again until the database answers
    finally:
        back.join()
    assert lease is not None and (lease.attempt, job(settings, job_id).status) == (1, "running")
