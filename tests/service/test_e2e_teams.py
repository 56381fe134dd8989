"""End-to-end: teams sharing a pool of real worker processes, driven over HTTP, on the embedded defaults
and on PostgreSQL + Redis: the isolation walk on a job a worker trained, the quotas, the fair-share
order, and the pool view as workers are killed and stopped. The tests share one service and run in order."""
from __future__ import annotations

import secrets
import signal
import subprocess
import sys

import pytest

from tests.service.isolation import TeamObjects, a_webhook, walk, walk_without_a_valid_key
from tests.service.processes import REPO, start_service
from tests.service.support import as_key, make_team

pytestmark = pytest.mark.slow
FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 2}
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module", params=[
    "embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def service(request, tmp_path_factory):
    env = {"DPO_WORKER_GPU_TYPE": "cpu", "DPO_WORKER_GPUS": "1"}
    if request.param == "postgres+redis":
        env |= {"DPO_DATABASE_URL": request.getfixturevalue("postgres_url"), **request.getfixturevalue("redis_env")}
    svc = start_service(tmp_path_factory.mktemp(request.param.replace("+", "-")), "e2e-" + secrets.token_hex(8), env)
    svc.backend = request.param
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def admin(service):
    with service.client() as c:
        yield c


def upload(admin, team, path) -> str:
    r = admin.post("/v1/files", headers=as_key(team["key"]), files={"file": (path.name, path.read_bytes())},
                   data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def submit(admin, team, file_id, model, **training) -> dict:
    r = admin.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]),
                   json={"model": model, "training_file": file_id, "training": {**FAST, **training},
                         "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
    assert r.status_code == 200, r.text
    return r.json()


def test_isolation_walk_on_a_trained_job(service, admin, task_files, tiny_model):
    a, b = make_team(admin, "walk-a"), make_team(admin, "walk-b")
    job = submit(admin, a, upload(admin, a, task_files[0]), tiny_model, max_steps=4, save_steps=2)
    done = service.wait_for_job(job["id"])
    assert done["status"] == "succeeded", f"{done['error']}\n{service.logs()}"
    checkpoint = admin.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"][-1]["id"]

    def call(method, url, key, **kw):
        return admin.request(method, url, headers=as_key(key), **kw)

    objects = TeamObjects(team_id=a["id"], key_id=a["key_id"], file_id=job["training_file"], job_id=job["id"],
                          checkpoint_id=checkpoint, results_file_id=done["result_files"][0],
                          webhook_id=a_webhook(call, a["key"]))

    from api.main import create_app

    walk(create_app(), call, objects, a["key"], b["key"], b["id"])
    assert admin.delete(f"/v1/admin/teams/{b['id']}/keys/{b['key_id']}").status_code == 200
    walk_without_a_valid_key(create_app(), call, objects, a["key"], b["key"])


def test_quotas_queue_and_cap_a_team(service, admin, task_files, tiny_model):
    service.add_worker("second", DPO_WORKER_GPU_TYPE="cpu")
    team = make_team(admin, "quota", max_running_jobs=1, max_queued_jobs=1)
    file_id = upload(admin, team, task_files[0])
    first = submit(admin, team, file_id, tiny_model, max_steps=100_000)
    service.wait_for_job(first["id"], until=("running",))
    second = submit(admin, team, file_id, tiny_model, max_steps=100_000)
    r = admin.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]),
                   json={"model": tiny_model, "training_file": file_id, "training": FAST})
    assert r.status_code == 429 and r.json()["error"]["type"] == "insufficient_quota", r.text

    # A cpu worker is free, but the team is at max_running_jobs. To know a dispatch pass offered that
    # worker the waiting job: worker "third" serves only GPU type "probe" and joined last, so every pass
    # offers the free cpu worker a job before it; once another team's probe job is dispatched to
    # "third", a pass that came after `second` was submitted has offered the free worker `second`.
    service.add_worker("third", DPO_WORKER_GPU_TYPE="probe")
    probe = _probe_job(service, admin, task_files[0], tiny_model)
    job = admin.get(f"/v1/fine_tuning/jobs/{second['id']}").json()
    assert (job["status"], job["queue_position"], job["worker"]) == ("queued", 1, None)
    assert "max_running_jobs" in job["queue_reason"]
    admin.post(f"/v1/fine_tuning/jobs/{probe}/cancel")
    assert service.wait_for_job(probe, timeout_s=60)["status"] == "cancelled"
    service.wait_for_worker("third", "idle")
    pool = admin.get("/v1/pool").json()
    assert sorted((w["state"], w["job"]) for w in pool["workers"] if w["state"] in ("idle", "busy")) == [
        ("busy", first["id"]), ("idle", None), ("idle", None)]
    assert [(t["team"], t["queued"], t["running"]) for t in pool["by_team"]] == [("quota", 1, 1)]

    admin.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel")
    # Bounds that a missed cancel (100,000 steps) or a job never started cannot meet, however loaded the machine.
    assert service.wait_for_job(first["id"], timeout_s=120)["status"] == "cancelled"
    service.wait_for_job(second["id"], until=("running",), timeout_s=120)
    admin.post(f"/v1/fine_tuning/jobs/{second['id']}/cancel")
    assert service.wait_for_job(second["id"], timeout_s=120)["status"] == "cancelled"


def _probe_job(service, admin, path, model) -> str:
    """A job of a team of its own for worker "third" (GPU type "probe"); returns once it is dispatched there."""
    team = make_team(admin, "probe")
    r = admin.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]),
                   json={"model": model, "training_file": upload(admin, team, path), "gpu_type": "probe",
                         "training": {**FAST, "max_steps": 100_000},
                         "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
    assert r.status_code == 200, r.text
    service.wait_for_job(r.json()["id"], pred=lambda j: j["worker"] == "third", timeout_s=60)
    return r.json()["id"]


def test_the_pool_shows_a_killed_worker_lost_and_a_stopped_one_stopped(service, admin):
    service.signal("second", signal.SIGKILL)
    lost = service.wait_for_worker("second", "lost", timeout_s=30)
    assert lost["seconds_since_heartbeat"] >= 3
    service.signal("third", signal.SIGTERM)  # idle since the quota test
    service.procs["third"].wait(timeout=30)
    service.wait_for_worker("third", "stopped", timeout_s=30)
    states = {w["name"]: w["state"] for w in admin.get("/v1/pool").json()["workers"]}
    assert states == {"worker": "idle", "second": "lost", "third": "stopped"}
    by_type = {g["gpu_type"]: g for g in admin.get("/v1/pool").json()["by_gpu_type"]}
    assert (by_type["cpu"]["idle_workers"], by_type["cpu"]["busy_workers"]) == (1, 0)


def event_order(service) -> dict[str, int]:
    """Each event's place among every job's events (events.seq), from the database: event ids are opaque."""
    from sqlalchemy import text

    from service.db.engine import make_engine

    engine = make_engine(service.env.get("DPO_DATABASE_URL") or f"sqlite:///{service.data_dir / 'dpo.sqlite'}")
    with engine.connect() as conn:
        order = dict(conn.execute(text("SELECT id, seq FROM events")).all())
    engine.dispose()
    return order


def test_fair_share_with_one_worker(service, admin, task_files, tiny_model):
    """Team A submits 10 jobs, then team B 2: B's first job is the next to start when A's first ends."""
    a, b = make_team(admin, "fair-a"), make_team(admin, "fair-b")
    fa, fb = upload(admin, a, task_files[0]), upload(admin, b, task_files[0])
    a_jobs = [submit(admin, a, fa, tiny_model, max_steps=6)["id"] for _ in range(10)]
    b_jobs = [submit(admin, b, fb, tiny_model, max_steps=6)["id"] for _ in range(2)]
    assert admin.get(f"/v1/fine_tuning/jobs/{a_jobs[0]}").json()["status"] not in TERMINAL, \
        "A's first job ended before B submitted; make the jobs longer"
    service.wait_for_job(b_jobs[0], until=("running", *TERMINAL), timeout_s=120)
    for job_id in a_jobs + b_jobs:  # the order is settled; the rest need not run
        admin.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    for job_id in a_jobs[:2] + b_jobs[:1]:
        service.wait_for_job(job_id, timeout_s=60)

    listed = {job_id: admin.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100})
              .json()["data"] for job_id in a_jobs + b_jobs}
    starts, ends, order_of = {}, {}, event_order(service)
    for job_id, events in listed.items():
        for e in events:
            seq = order_of[e["id"]]
            status = (e["data"] or {}).get("status")
            if status == "running":
                starts[job_id] = seq
            elif status in TERMINAL:
                ends[job_id] = seq
    order = sorted(starts, key=starts.get)
    assert order[:2] == [a_jobs[0], b_jobs[0]], f"start order {order}"
    assert ends[a_jobs[0]] < starts[b_jobs[0]]
    first, second = (admin.get(f"/v1/fine_tuning/jobs/{j}").json() for j in (a_jobs[0], b_jobs[0]))
    # B's job was sent once and started as soon as the worker was free (a lost message would show as a
    # requeue, resent only after DPO_DISPATCH_TIMEOUT_S); the bound only catches a worker left idle.
    requeues = [(e["data"] or {}).get("code") for e in listed[b_jobs[0]] if (e["data"] or {}).get("status") == "queued"]
    assert requeues == [None], requeues
    assert first["status"] == "succeeded" and second["started_at"] - first["finished_at"] <= 60


def test_the_admin_cli_manages_teams_over_http(service):
    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", "admin", "--url", service.url, "--key", service.key,
                               *args], cwd=REPO, env=service.env, capture_output=True, text=True, timeout=60)

    import json

    made = cli("teams", "create", "cli-team", "--max-running-jobs", "2", "--max-storage-bytes", "1000000")
    assert made.returncode == 0, made.stderr
    team = json.loads(made.stdout)
    assert (team["name"], team["max_running_jobs"], team["max_queued_jobs"], team["max_storage_bytes"]) == (
        "cli-team", 2, None, 1000000)
    key = cli("keys", "create", team["id"], "--name", "laptop")
    assert key.returncode == 0 and key.stderr.strip()  # the warning that the key is shown once: not in the JSON
    secret, key_id = json.loads(key.stdout)["key"], json.loads(key.stdout)["id"]
    with service.client() as c:
        assert c.get("/v1/usage", headers=as_key(secret)).json()["team_id"] == team["id"]
    updated = json.loads(cli("teams", "update", team["id"], "--max-running-jobs", "none", "--max-storage-bytes",
                             "none").stdout)
    assert updated["max_running_jobs"] is None and updated["max_storage_bytes"] is None
    assert cli("keys", "revoke", team["id"], key_id).returncode == 0
    with service.client() as c:
        assert c.get("/v1/usage", headers=as_key(secret)).status_code == 401
    listed = json.loads(cli("teams", "list").stdout)["data"]
    assert "cli-team" in [t["name"] for t in listed]
    assert json.loads(cli("pool").stdout)["object"] == "pool"
    assert "cli-team" in [u["team"] for u in json.loads(cli("usage").stdout)["data"]]
    dup = cli("teams", "create", "cli-team")
    assert dup.returncode == 1 and "409" in dup.stderr and "cli-team" in dup.stderr
    assert cli("teams", "delete", team["id"]).returncode == 0
