"""Unit and integration: how a worker names its GPUs, registers, sends heartbeats and leaves."""
from __future__ import annotations

import faulthandler
import os
import subprocess
import time

import pytest
from sqlalchemy import select, update

from service.db import leases
from service.db.engine import make_engine, make_sessionmaker
from service.db.migrate import upgrade
from service.db.models import DEFAULT_TEAM_ID, Event, Job, JobStatus, Worker, new_id
from service.errors import Conflict, LeaseLost
from service.scheduler import dispatch_pass
from tests.service.support import make_settings, sessions_for
from worker import membership
from worker.membership import Identity, Membership, gpu_type_of, identity


@pytest.mark.parametrize("name, kind", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"), ("Tesla T4", "t4"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA RTX A6000", "a6000"), ("NVIDIA L40S", "l40s"),
    ("NVIDIA H200", "h200"), ("AMD Instinct MI300X", "mi300x"), ("Mystery", "mystery"), ("", "gpu"),
])
def test_gpu_types_from_device_names(name, kind):
    assert gpu_type_of(name) == kind


def test_identity_from_settings_or_detection(tmp_path, monkeypatch):
    seen, h100 = [], ("NVIDIA H100 80GB HBM3", 85_520_809_984)
    monkeypatch.setattr(membership, "detect_gpus", lambda: seen.append(1) or [h100] * 2)
    me = identity(make_settings(tmp_path, worker_name="w", worker_gpu_type="CPU", worker_gpus=3))
    assert (me.name, me.gpu_type, me.gpus, seen) == ("w", "cpu", 3, [])  # configured: nothing detected
    assert me.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # a CPU worker: its RAM
    me = identity(make_settings(tmp_path))
    assert (me.gpu_type, me.gpus, me.name.endswith(f"-{me.pid}"), me.memory_bytes) == ("h100", 2, True, h100[1])
    # A configured GPU type still reads the memory of the GPUs it sees.
    me = identity(make_settings(tmp_path, worker_gpu_type="h100", worker_gpus=1))
    assert (me.gpu_type, me.gpus, me.memory_bytes) == ("h100", 1, h100[1])
    monkeypatch.setattr(membership, "detect_gpus", lambda: [])
    assert (identity(make_settings(tmp_path)).gpu_type, identity(make_settings(tmp_path)).gpus) == ("cpu", 1)
    assert identity(make_settings(tmp_path)).memory_bytes == membership.ram_bytes()


def test_detection_without_cuda_finds_nothing():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert membership.detect_gpus() == []


def test_join_beat_and_leave(tmp_path):
    settings = make_settings(tmp_path / "data", worker_heartbeat_interval_s=0.1, worker_lost_after_s=1)
    upgrade(settings.db_url)
    me = Identity(name="w1", gpu_type="cpu", gpus=1, hostname="h", pid=os.getpid(),  # a live process
                  memory_bytes=24 << 30)
    member = Membership(settings, me)
    member.join()
    assert member.queue == f"{settings.queue}.{member.worker_id}"
    assert _row(settings, member.worker_id).memory_bytes == 24 << 30
    first = _row(settings, member.worker_id).last_heartbeat_at
    member.start_heartbeats()
    deadline = time.monotonic() + 30  # a beat every 0.1 s: the first one, however loaded the machine
    while _row(settings, member.worker_id).last_heartbeat_at <= first:
        assert time.monotonic() < deadline, "no heartbeat was written"
        time.sleep(0.05)
    # The name is taken while this worker lives.
    with pytest.raises(Conflict, match="w1"):
        Membership(settings, Identity(name="w1", gpu_type="cpu", gpus=1, hostname="h", pid=11)).join()
    member.leave()
    assert _row(settings, member.worker_id).stopped_at is not None
    again = Membership(settings, Identity(name="w1", gpu_type="cpu", gpus=2, hostname="h", pid=11))
    again.join()  # a stopped worker's name is free: the same row, taken over
    row = _row(settings, member.worker_id)
    assert (again.worker_id, row.gpus, row.pid, row.stopped_at) == (member.worker_id, 2, 11, None)
    again.leave()


def test_a_worker_stopped_while_its_heartbeats_start_still_leaves_stopped(tmp_path):
    """A SIGTERM that lands while the heartbeat thread starts (its SystemExit raised inside
    Thread.start) leaves a thread that was never seen started; leaving must still mark the worker."""
    import threading

    settings = make_settings(tmp_path / "data")
    upgrade(settings.db_url)
    member = Membership(settings, Identity(name="w1", gpu_type="cpu", gpus=1, hostname="h", pid=10))
    member.join()
    member._thread = threading.Thread(target=lambda: None)  # created, start() interrupted before it ran
    member.leave()
    assert _row(settings, member.worker_id).stopped_at is not None


def test_a_process_forked_while_the_heartbeat_runs_can_use_the_database(tmp_path):
    """The worker's main process forks a process for each job while its heartbeat thread writes to the
    database. A child forked in the middle of a heartbeat would inherit SQLite's locks held by a thread it
    does not have: its first query would hang for good or fail with "database is locked" (with heartbeats
    this fast, within the first few forks). A fork waits for the heartbeat to finish."""
    settings = make_settings(tmp_path / "data", worker_heartbeat_interval_s=0.001, worker_lost_after_s=1)
    upgrade(settings.db_url)
    member = Membership(settings, Identity(name="w1", gpu_type="cpu", gpus=1, hostname="h", pid=10))
    member.join()
    member.start_heartbeats()
    try:
        for i in range(40):
            pid = os.fork()
            if pid == 0:  # a job process: its own engine, as worker.runner makes one
                faulthandler.dump_traceback_later(10, exit=True)  # hung: exit 1, with the stack in the test's stderr
                code = 2  # an error ("database is locked")
                try:
                    engine = make_engine(settings.db_url)
                    with make_sessionmaker(engine).begin() as s:
                        s.execute(update(Worker).where(Worker.id == member.worker_id).values(gpus=1))
                    engine.dispose()
                    code = 0
                finally:
                    os._exit(code)
            exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            assert exit_code == 0, f"the process forked at beat {i} could not use the database (exit {exit_code})"
    finally:
        member.leave()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _me(pid: int, host: str = "this-host") -> Identity:
    return Identity(name="w1", gpu_type="cpu", gpus=1, hostname=host, pid=pid)


def _running_job(settings, worker_id: str) -> tuple[str, leases.Lease]:
    """A job dispatched to the worker and started there (the run's lease taken)."""
    sessions = sessions_for(settings)
    with sessions.begin() as s:
        job = Job(id=new_id("ftjob"), team_id=DEFAULT_TEAM_ID, status=JobStatus.QUEUED.value, model="m",
                  training_file="file-x", method={}, hyperparameters={}, spec={}, created_at=int(time.time()),
                  result_files=[], cancel_requested=False, max_attempts=3)
        s.add(job)
    assert [a.job_id for a in dispatch_pass(sessions, settings, lambda a: None)] == [job.id]
    with sessions.begin() as s:
        return job.id, leases.acquire(s, job.id, worker_id, "w1", settings.job_lease_s)


@pytest.fixture
def pool(tmp_path):
    settings = make_settings(tmp_path / "data", worker_lost_after_s=60, job_lease_s=60)
    upgrade(settings.db_url)
    return settings


def test_a_worker_restarted_after_a_crash_takes_its_name_over_and_its_run_is_lost_at_once(pool):
    crashed = Membership(pool, _me(_dead_pid()))
    crashed.join()  # its heartbeat is fresh: by the heartbeat alone, it is alive for another minute
    job_id, lease = _running_job(pool, crashed.worker_id)

    again = Membership(pool, _me(os.getpid()))
    again.join()  # no Conflict: the pid it was registered under is gone from this host
    assert again.worker_id == crashed.worker_id and _row(pool, again.worker_id).pid == os.getpid()
    with sessions_for(pool)() as s:
        job = s.get(Job, job_id)
        last = s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.seq.desc())).first()
    # The reconciler's repair of a lost run, at once: an attempt used, queued to resume from its checkpoint.
    assert (job.status, job.worker_id, job.attempts, job.lease_expires_at) == ("queued", None, 1, None)
    assert last.data == {"status": "queued", "code": "worker_lost", "cause": "worker_restarted", "worker": "w1",
                         "step": None, "attempts": 1, "max_attempts": 3}
    with pytest.raises(LeaseLost), sessions_for(pool).begin() as s:  # the dead run's writes stay fenced off
        leases.hold(s, lease, pool.job_lease_s)


def test_a_dispatched_job_of_the_crashed_worker_is_queued_again_at_once(pool):
    crashed = Membership(pool, _me(_dead_pid()))
    crashed.join()
    job_id, _ = _running_job(pool, crashed.worker_id)
    with sessions_for(pool).begin() as s:  # back to dispatched: the worker died before starting it
        s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.DISPATCHED.value))
    Membership(pool, _me(os.getpid())).join()
    with sessions_for(pool)() as s:
        assert (s.get(Job, job_id).status, s.get(Job, job_id).attempts) == ("queued", 1)


@pytest.mark.parametrize("case", ["alive", "other-host"])
def test_a_name_held_by_a_live_process_or_on_another_host_stays_refused(pool, case):
    holder = Membership(pool, _me(os.getpid() if case == "alive" else _dead_pid(),
                                  "this-host" if case == "alive" else "other-host"))
    holder.join()
    job_id, _ = _running_job(pool, holder.worker_id)
    with pytest.raises(Conflict, match="w1"):
        Membership(pool, _me(os.getpid() + 1 if case == "alive" else os.getpid())).join()
    with sessions_for(pool)() as s:
        assert s.get(Job, job_id).status == "running"  # left to its lease


def test_a_pid_reused_by_a_later_process_or_a_zombie_does_not_hold_the_name():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert not membership.process_gone(os.getpid(), time.time(), my_pid=0)  # this process: alive
        assert membership.process_gone(sleeper.pid, time.time() - 10, my_pid=0)  # started after that registration
        assert not membership.process_gone(sleeper.pid, time.time() + 10, my_pid=0)
        assert membership.process_gone(sleeper.pid, time.time() + 10, my_pid=sleeper.pid)  # the pid is mine now
        sleeper.kill()
        deadline = time.monotonic() + 10
        while membership.process_stat(sleeper.pid)[0] != "Z":  # dead, not reaped yet: a zombie
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert membership.process_gone(sleeper.pid, time.time() + 10, my_pid=0)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert membership.process_gone(sleeper.pid, time.time() + 10, my_pid=0)


def _row(settings, worker_id: str) -> Worker:
    with sessions_for(settings)() as s:
        return s.get(Worker, worker_id)
