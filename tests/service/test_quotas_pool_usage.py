"""Integration: quotas at job creation, each waiting job's place and reason, the pool view and usage
reports, through the real app on SQLite in-process (workers are registered rows here; the end-to-end
tests run real ones)."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import update

from service.db import leases
from service.db.models import Job, JobStatus, Run, Worker
from service.reconciler import reconcile
from tests.service.support import as_key, dispatch, make_team, register_worker, sessions_for, upload

TRAINING = {"max_length": 64, "max_prompt_length": 32}


def submit(client, key: str, file_id: str, **extra):
    return client.post("/v1/fine_tuning/jobs", headers=as_key(key),
                       json={"model": "m", "training_file": file_id, "training": TRAINING, **extra})


def test_a_team_at_max_queued_jobs_gets_429_until_one_leaves_the_queue(client, task_files):
    team = make_team(client, "small", max_queued_jobs=2)
    file_id = upload(client, task_files[1], headers=as_key(team["key"]))["id"]
    first, _ = (submit(client, team["key"], file_id).json() for _ in range(2))
    r = submit(client, team["key"], file_id)
    assert r.status_code == 429
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("insufficient_quota", None, "quota_exceeded")
    assert "small" in error["message"] and "max_queued_jobs" in error["message"]  # names the team and the limit
    assert len(client.get("/v1/fine_tuning/jobs", headers=as_key(team["key"])).json()["data"]) == 2
    client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel", headers=as_key(team["key"]))
    assert submit(client, team["key"], file_id).status_code == 200
    # Other teams are not held back by this one's limit.
    assert submit(client, "test-admin-key", upload(client, task_files[1])["id"]).status_code == 200


def test_queue_position_and_reason_follow_the_team_queue(client, settings, task_files):
    team = make_team(client, "t", max_running_jobs=1)
    key = team["key"]
    file_id = upload(client, task_files[1], headers=as_key(key))["id"]
    low = submit(client, key, file_id).json()
    assert (low["queue_position"], low["queue_reason"]) == (
        1, "no live worker in the pool; the job waits until one registers")
    register_worker(settings, "cpu-1")
    high = submit(client, key, file_id, priority=10).json()
    picky = submit(client, key, file_id, gpu_type="H100").json()
    assert (high["priority"], high["queue_position"], picky["gpu_type"], picky["queue_position"]) == (10, 1, "h100", 3)
    assert picky["queue_reason"] == ("no live worker can serve it: it asks for 1 GPU of type h100; "
                                     "the pool has 1 x cpu (1 GPUs)")
    job = lambda j: client.get(f"/v1/fine_tuning/jobs/{j['id']}", headers=as_key(key)).json()  # noqa: E731
    assert job(low)["queue_position"] == 2
    assert job(low)["queue_reason"] == ("waiting for a free worker (fair share across teams); "
                                        "1 of the team's jobs ahead of it")

    (sent,) = dispatch(settings)
    assert sent.job_id == high["id"]  # priority first
    assert (job(high)["status"], job(high)["queue_position"], job(high)["worker"]) == ("queued", 0, "cpu-1")
    register_worker(settings, "cpu-2", pid=2)
    assert dispatch(settings) == []  # a free worker, but the team is at max_running_jobs
    assert job(low)["queue_reason"] == "team t is at its max_running_jobs (1); it starts when one ends"
    listed = client.get("/v1/fine_tuning/jobs", headers=as_key(key)).json()["data"]
    assert [(j["id"], j["queue_position"]) for j in listed] == [(picky["id"], 2), (high["id"], 0), (low["id"], 1)]


def test_scheduling_fields_are_validated(client, task_files):
    file_id = upload(client, task_files[1])["id"]
    r = submit(client, "test-admin-key", file_id, gpus=2)
    assert r.status_code == 200 and r.json()["gpus"] == 2, r.text
    for bad in ({"gpus": 0}, {"gpus": 65}, {"priority": 101}, {"gpu_type": "h100 80gb"}):
        r = submit(client, "test-admin-key", file_id, **bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text


def test_the_pool_shows_each_worker_and_the_queues(client, settings, task_files):
    a, b = make_team(client, "a"), make_team(client, "b")
    idle = register_worker(settings, "idle", pid=1)
    busy = register_worker(settings, "busy", gpu_type="h100", gpus=8, pid=2)
    lost = register_worker(settings, "lost", pid=3)
    stopped = register_worker(settings, "stopped", pid=4)
    with sessions_for(settings).begin() as s:
        s.execute(update(Worker).where(Worker.id == lost).values(last_heartbeat_at=time.time() - 600))
        s.execute(update(Worker).where(Worker.id == stopped).values(stopped_at=time.time()))
    fa = upload(client, task_files[1], headers=as_key(a["key"]))["id"]
    running = submit(client, a["key"], fa, gpu_type="h100").json()
    assert [(x.job_id, x.worker_id) for x in dispatch(settings)] == [(running["id"], busy)]
    with sessions_for(settings).begin() as s:
        s.execute(update(Job).where(Job.id == running["id"]).values(status="running", started_at=time.time()))
    for _ in range(2):
        submit(client, a["key"], fa)
    submit(client, b["key"], upload(client, task_files[1], headers=as_key(b["key"]))["id"], gpu_type="a100")

    pool = client.get("/v1/pool").json()
    states = {w["name"]: (w["state"], w["job"], w["gpu_type"], w["gpus"]) for w in pool["workers"]}
    assert states == {"idle": ("idle", None, "cpu", 1), "busy": ("busy", running["id"], "h100", 8),
                      "lost": ("lost", None, "cpu", 1), "stopped": ("stopped", None, "cpu", 1)}
    assert next(w for w in pool["workers"] if w["name"] == "lost")["seconds_since_heartbeat"] >= 600
    assert pool["queued"] == 3 and pool["lost_after_s"] == settings.worker_lost_after_s
    assert {(t["team"], t["queued"], t["running"]) for t in pool["by_team"]} == {("a", 2, 1), ("b", 1, 0)}
    by_type = {g["gpu_type"]: (g["queued"], g["running"], g["idle_workers"], g["busy_workers"])
               for g in pool["by_gpu_type"]}
    assert by_type == {"any": (2, 0, 1, 1), "a100": (1, 0, 0, 0), "h100": (0, 1, 0, 1), "cpu": (0, 0, 1, 0)}

    mine = client.get("/v1/pool", headers=as_key(b["key"])).json()
    assert [(t["team"], t["queued"]) for t in mine["by_team"]] == [("b", 1)] and mine["queued"] == 1
    assert next(w for w in mine["workers"] if w["name"] == "busy")["job"] is None  # A's job is not B's business
    assert idle


def test_usage_counts_gpu_seconds_jobs_and_tokens_per_team(client, settings, task_files):
    a, b = make_team(client, "a"), make_team(client, "b")
    fa = upload(client, task_files[1], headers=as_key(a["key"]))["id"]
    done, cancelled, waiting = (submit(client, a["key"], fa).json()["id"] for _ in range(3))
    now = time.time()
    with sessions_for(settings).begin() as s:
        for job_id, status, started, ended, tokens in ((done, "succeeded", now - 100, now - 40, 5000),
                                                       (cancelled, "cancelled", now - 30, now - 20, 700)):
            s.execute(update(Job).where(Job.id == job_id).values(status=status, started_at=started,
                                                                 finished_at=ended, trained_tokens=tokens))
            s.add(Run(job_id=job_id, team_id=a["id"], gpus=1, token=1, attempt=1, worker="w", started_at=started,
                      ended_at=ended, outcome=status))
    usage = client.get("/v1/usage", headers=as_key(a["key"])).json()
    assert (usage["team_id"], usage["team"], usage["trained_tokens"]) == (a["id"], "a", 5700)
    assert abs(usage["gpu_seconds"] - 70) < 1 and abs(usage["fair_share_gpu_seconds"] - 70) < 1
    assert usage["jobs"] == {"total": 3, "queued": 1, "running": 0, "paused": 0, "succeeded": 1, "failed": 0,
                             "cancelled": 1}
    clipped = client.get("/v1/usage", headers=as_key(a["key"]), params={"since": now - 50}).json()
    assert abs(clipped["gpu_seconds"] - 20) < 1  # 10 s of the first run and all 10 of the second

    assert client.get("/v1/usage", headers=as_key(b["key"])).json()["gpu_seconds"] == 0
    everyone = {u["team"]: u for u in client.get("/v1/admin/usage").json()["data"]}
    assert set(everyone) == {"default", "a", "b"} and everyone["a"]["jobs"]["total"] == 3
    assert client.get("/v1/admin/usage", headers=as_key(a["key"])).status_code == 403
    r = client.get("/v1/usage", params={"since": now, "until": now - 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "since"
    assert waiting


def test_usage_counts_only_the_runs_not_the_wait_after_a_lost_worker(client, settings, task_files):
    """A 2-GPU job's run is lost and the reconciler queues it again: /v1/usage counts the 30 s the run
    lasted (x 2 GPUs), and no more however long the job then waits; a second run adds its own time."""
    a = make_team(client, "a")
    fa = upload(client, task_files[1], headers=as_key(a["key"]))["id"]
    job_id = submit(client, a["key"], fa, gpus=2).json()["id"]
    worker = register_worker(settings, "big", gpus=2)
    assert [x.job_id for x in dispatch(settings)] == [job_id]
    now = time.time()
    with sessions_for(settings).begin() as s:
        lease = leases.acquire(s, job_id, worker, "big", settings.job_lease_s, at=now - 100)
        leases.hold(s, lease, settings.job_lease_s, at=now - 70)  # its last renewal: the run lasted 30 s
        s.execute(update(Worker).where(Worker.id == worker).values(last_heartbeat_at=now - 3600))
    reconcile(sessions_for(settings), settings, now)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=as_key(a["key"])).json()["status"] == "queued"

    def usage(until: float) -> dict:
        return client.get("/v1/usage", headers=as_key(a["key"]), params={"until": until}).json()

    for later in (0, 600, 86400):
        assert usage(now + later)["gpu_seconds"] == pytest.approx(60, abs=0.5)
    assert usage(now)["fair_share_gpu_seconds"] == pytest.approx(60, abs=0.5)

    worker = register_worker(settings, "big-2", gpus=2, pid=2)
    assert [x.job_id for x in dispatch(settings)] == [job_id]
    with sessions_for(settings).begin() as s:
        lease = leases.acquire(s, job_id, worker, "big-2", settings.job_lease_s, at=time.time() - 15)
        leases.finish(s, lease, JobStatus.SUCCEEDED)
    assert usage(time.time())["gpu_seconds"] == pytest.approx(60 + 30, abs=0.5)  # the two runs, 2 GPUs each
