"""Integration: pausing and resuming a job, on a real database (SQLite, and PostgreSQL when configured),
with jobs and workers as rows and time moved by hand: the status machine (queued, dispatched, running,
paused, finished), and the races the conditional updates guard: a pause against the run's finish, its
hand-back, its lost lease, and a dispatched job's worker."""
from __future__ import annotations

import threading
import time

import pytest

from service.db import jobs, leases
from service.db.models import JobStatus
from service.errors import Conflict
from service.reconciler import reconcile
from tests.service.support import register_worker, sessions_for
from tests.service.test_leases import dispatch, events, expire, job, runs, settings, start, submit  # noqa: F401


def pause(settings, job_id) -> JobStatus:
    with sessions_for(settings).begin() as s:
        return jobs.pause(s, job_id)


def resume(settings, job_id) -> None:
    with sessions_for(settings).begin() as s:
        jobs.resume(s, job_id)


def conflict(fn, *args) -> str:
    with pytest.raises(Conflict) as caught:
        fn(*args)
    return caught.value.code


def test_a_queued_job_pauses_at_once_and_resume_queues_it(settings):
    register_worker(settings, "w1")
    job_id = submit(settings)
    assert pause(settings, job_id) == JobStatus.PAUSED
    assert pause(settings, job_id) == JobStatus.PAUSED  # asked again: nothing changes
    assert events(settings, job_id)[-1].data == {"status": "paused", "code": "paused"}
    assert [e.data.get("status") for e in events(settings, job_id)] == ["paused"]  # one event
    assert dispatch(settings) == []  # a paused job is never given to a worker
    resume(settings, job_id)
    assert events(settings, job_id)[-1].data == {"status": "queued", "code": "resumed"}
    assert conflict(resume, settings, job_id) == "job_not_paused"
    assert dispatch(settings) == [job_id]
    assert runs(settings, job_id) == []


def test_a_dispatched_job_pauses_at_once_and_its_worker_skips_it(settings):
    w1 = register_worker(settings, "w1")
    job_id, other = submit(settings), submit(settings)
    assert dispatch(settings) == [job_id]
    assert pause(settings, job_id) == JobStatus.PAUSED
    row = job(settings, job_id)
    assert (row.status, row.worker_id, row.dispatched_at) == ("paused", None, None)
    assert start(settings, job_id, w1) is None  # its message arrives late: nothing starts
    assert dispatch(settings) == [other]  # the worker is free for another job


def test_a_running_job_pauses_after_its_checkpoint_and_its_run_ends(settings):
    w1 = register_worker(settings, "w1")
    job_id = submit(settings)
    dispatch(settings)
    lease = start(settings, job_id, w1)
    assert conflict(resume, settings, job_id) == "job_not_paused"
    assert pause(settings, job_id) == JobStatus.RUNNING
    assert pause(settings, job_id) == JobStatus.RUNNING
    row = job(settings, job_id)
    assert (row.status, row.pause_requested) == ("running", True)
    assert [e.data for e in events(settings, job_id)].count({"code": "pause_requested"}) == 1
    assert conflict(resume, settings, job_id) == "job_not_paused"  # not paused yet

    with sessions_for(settings).begin() as s:  # what the runner does once the run stopped after its checkpoint
        leases.hold(s, lease, settings.job_lease_s)
        leases.hand_back(s, lease, "w1", 7, paused=True)
    row = job(settings, job_id)
    assert (row.status, row.attempts, row.worker_id, row.pause_requested) == ("paused", 0, None, False)
    assert runs(settings, job_id) == [(1, 1, "handed_back", True)]  # its GPU time stops with the run
    assert events(settings, job_id)[-1].data == {"status": "paused", "code": "paused", "worker": "w1", "step": 7}
    assert dispatch(settings) == []

    resume(settings, job_id)
    assert dispatch(settings) == [job_id]
    again = start(settings, job_id, w1)
    assert (again.token, again.attempt, job(settings, job_id).pause_requested) == (2, 1, False)


def test_a_pause_racing_the_finish_gets_409_and_a_finished_job_stays_so(settings):
    w1 = register_worker(settings, "w1")
    job_id = submit(settings)
    dispatch(settings)
    lease = start(settings, job_id, w1)
    assert pause(settings, job_id) == JobStatus.RUNNING
    with sessions_for(settings).begin() as s:  # the last step had run: the run finishes, pause or not
        leases.finish(s, lease, JobStatus.SUCCEEDED)
    assert job(settings, job_id).status == "succeeded"
    assert conflict(pause, settings, job_id) == "job_finished"
    assert conflict(resume, settings, job_id) == "job_not_paused"


def test_a_pause_waiting_on_a_hand_back_pauses_the_requeued_job(settings):
    """The run hands its job back (its worker shuts down) in a transaction the pause has to wait for; the
    pause then finds the job queued, not running, and pauses it there."""
    w1 = register_worker(settings, "w1")
    job_id = submit(settings)
    dispatch(settings)
    lease = start(settings, job_id, w1)
    outcome = []
    with sessions_for(settings).begin() as s:
        leases.hold(s, lease, settings.job_lease_s)  # the run's write holds the job's row from here
        leases.hand_back(s, lease, "w1", 3)
        pauser = threading.Thread(target=lambda: outcome.append(pause(settings, job_id)))
        pauser.start()
        time.sleep(0.3)  # the pause is waiting for the row
    pauser.join(timeout=30)
    assert outcome == [JobStatus.PAUSED]
    assert job(settings, job_id).status == "paused"
    assert [e.data.get("status") for e in events(settings, job_id) if e.data and "status" in e.data] == [
        "running", "queued", "paused"]


def test_a_pausing_job_whose_run_is_lost_is_paused(settings):
    w1 = register_worker(settings, "w1")
    job_id = submit(settings)
    dispatch(settings)
    start(settings, job_id, w1)
    pause(settings, job_id)
    assert reconcile(sessions_for(settings), settings, expire(settings, job_id)) == 1
    row = job(settings, job_id)
    assert (row.status, row.attempts, row.worker_id, row.pause_requested) == ("paused", 1, None, False)
    assert events(settings, job_id)[-1].data["status"] == "paused"
    assert runs(settings, job_id) == [(1, 1, "lost", True)]


def test_a_paused_job_can_be_cancelled_and_a_cancelling_one_not_paused(settings):
    w1 = register_worker(settings, "w1")
    paused = submit(settings)
    pause(settings, paused)
    with sessions_for(settings).begin() as s:
        assert jobs.cancel(s, paused) == JobStatus.CANCELLED
    assert job(settings, paused).status == "cancelled"

    running = submit(settings)
    dispatch(settings)
    start(settings, running, w1)
    with sessions_for(settings).begin() as s:
        jobs.cancel(s, running)
    assert conflict(pause, settings, running) == "job_cancelling"


def test_the_status_machine_lists_paused_everywhere_statuses_are_listed():
    from service.db.models import PUBLIC_STATUSES, public_status, stored_statuses

    assert PUBLIC_STATUSES == ("queued", "running", "succeeded", "failed", "cancelled", "paused")
    assert public_status("paused") == "paused" and stored_statuses("paused") == ("paused",)
    assert not JobStatus.PAUSED.terminal
