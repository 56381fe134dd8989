"""Integration: /v1/fine_tuning/jobs through the real app on SQLite; the broker is the embedded one,
read back here to check that only the job id travels."""
from __future__ import annotations

import pytest
from sqlalchemy import event

from api.queue import make_celery
from service.broker import RUN_JOB_TASK
from service.db.models import Job
from tests.service.support import as_key, make_team, register_worker, sessions_for, upload

TRAINING = {"max_length": 64, "max_prompt_length": 32}


@pytest.fixture
def train_id(client, task_files) -> str:
    return upload(client, task_files[0])["id"]


def create(client, train_id, **extra):
    body = {"model": "tiny-org/tiny-model", "training_file": train_id, "training": TRAINING,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4}}}, **extra}
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_create_returns_a_queued_job_and_sends_only_its_id(client, train_id, settings):
    r = create(client, train_id, suffix="demo", metadata={"team": "a"}, seed=3)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["id"].startswith("ftjob-") and job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["hyperparameters"] == {"beta": 0.2, "batch_size": 4, "n_epochs": 1.0, "learning_rate_multiplier": 1.0}
    assert job["method"]["dpo"]["hyperparameters"] == job["hyperparameters"]
    assert (job["seed"], job["user_provided_suffix"], job["metadata"]) == (3, "demo", {"team": "a"})
    assert job["training"]["loss"]["beta"] == 0.2 and "output_dir" not in job["training"]
    assert job["progress"] == {"step": None, "total_steps": None, "epoch": None, "tokens_per_s": None}
    assert job["error"] is None and job["fine_tuned_model"] is None
    assert (job["team"], job["organization_id"], job["priority"], job["gpu_type"], job["gpus"]) == (
        "team-default", "team-default", 0, None, 1)
    assert job["queue_position"] == 1 and "no live worker" in job["queue_reason"]
    # Nothing travels until a worker is free; then the dispatcher sends the job id, and only it, to that
    # worker's own queue.
    worker_id = register_worker(settings)
    (sent,) = client.app.state.dispatcher.run_once()
    assert (sent.job_id, sent.worker_id, sent.queue) == (job["id"], worker_id, f"{settings.queue}.{worker_id}")
    with make_celery(settings).connection_for_read() as conn:
        message = conn.SimpleQueue(sent.queue).get(timeout=5)
    assert message.headers["task"] == RUN_JOB_TASK
    assert message.payload[0] == [job["id"]] and message.payload[1] == {}
    job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert (job["status"], job["queue_position"], job["worker"]) == ("queued", 0, "test-worker")


def test_a_job_row_is_written_queued_with_its_status_event(client, train_id):
    """The files and spec are checked before the row is written: its first status is queued (OpenAI's
    validating_files never applies), and the events record that status."""
    inserted = []

    def record(_mapper, _connection, job):
        inserted.append(job.status)

    event.listen(Job, "before_insert", record)
    try:
        job = create(client, train_id).json()
    finally:
        event.remove(Job, "before_insert", record)
    assert inserted == ["queued"] and job["status"] == "queued"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"order": "asc"}).json()["data"]
    assert [e["data"] for e in events] == [{"code": "created"}, {"status": "queued"}]


@pytest.mark.parametrize("change, param", [
    ({"method": {"type": "supervised"}}, "method.type"),
    ({"training_file": "file-missing"}, "training_file"),
    ({"validation_file": "file-missing"}, "validation_file"),
    ({"training": {"output_dir": "/etc"}}, "training.output_dir"),
    ({"training": {"reference_mode": "precomputed", "reference_cache": "/etc"}}, "training.reference_cache"),
    ({"training": {**TRAINING, "loss": {"type": "nope"}}}, "training.loss.type"),
    ({"training": {**TRAINING, "lora": {"r": 0}}}, "training.lora.r"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}}, "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}}, "method.dpo.hyperparameters.beta"),
    ({"model": ""}, "model"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_invalid_requests_are_400_naming_the_parameter(client, train_id, change, param):
    r = create(client, train_id, **change)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_list_retrieve_and_cursor_pagination(client, train_id):
    ids = [create(client, train_id).json()["id"] for _ in range(5)]
    first = client.get("/v1/fine_tuning/jobs", params={"limit": 3}).json()
    assert first["object"] == "list" and len(first["data"]) == 3 and first["has_more"]
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 3, "after": first["last_id"]}).json()
    assert len(rest["data"]) == 2 and not rest["has_more"]
    assert sorted(j["id"] for j in first["data"] + rest["data"]) == sorted(ids)
    assert client.get(f"/v1/fine_tuning/jobs/{ids[0]}").json()["id"] == ids[0]
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404
    for listed in first["data"] + rest["data"]:  # list: Job objects; status: a row. Same fields
        assert listed == client.get(f"/v1/fine_tuning/jobs/{listed['id']}").json()
    for bad in ("ftjob-nope", "ftjob-" + "0" * 24, "x"):
        r = client.get("/v1/fine_tuning/jobs", params={"after": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "after"
    assert client.get("/v1/fine_tuning/jobs", params={"limit": 0}).status_code == 400


def test_list_by_status_pages_and_spans_teams_for_the_admin(client, train_id, settings, task_files):
    team = make_team(client, "status-team")
    theirs = upload(client, task_files[0], headers=as_key(team["key"]))["id"]
    ids = [create(client, train_id).json()["id"] for _ in range(4)]
    their_ids = [client.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]), json={
        "model": "tiny-org/tiny-model", "training_file": theirs, "training": TRAINING}).json()["id"] for _ in range(2)]
    stored = {ids[0]: "running", ids[1]: "dispatched", ids[2]: "failed", ids[3]: "failed",
              their_ids[0]: "failed", their_ids[1]: "succeeded"}
    with sessions_for(settings).begin() as s:
        for job_id, status in stored.items():
            s.get(Job, job_id).status = status

    def listed(headers=None, **params):
        r = client.get("/v1/fine_tuning/jobs", params=params, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    def walk(status, headers=None):  # every page of 1
        seen, after = [], None
        while True:
            page = listed(headers, status=status, limit=1, **({"after": after} if after else {}))
            seen += page["data"]
            if not page["has_more"]:
                return seen
            after = page["last_id"]

    failed = walk("failed")  # the admin: every team's, newest first
    assert [j["id"] for j in failed] == [their_ids[0], ids[3], ids[2]]
    assert all(j["status"] == "failed" for j in failed)
    assert [j["id"] for j in walk("failed", as_key(team["key"]))] == [their_ids[0]]
    assert [j["id"] for j in walk("queued")] == [ids[1]]  # dispatched is queued to users
    assert listed(status="queued")["data"][0]["status"] == "queued"
    assert [j["id"] for j in walk("running")] == [ids[0]]
    assert walk("succeeded", as_key(team["key"]))[0]["id"] == their_ids[1]
    assert walk("cancelled") == [] and walk("paused") == []
    for bad in ("dispatched", "done", "FAILED", ""):
        r = client.get("/v1/fine_tuning/jobs", params={"status": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "status", bad


def test_cancel_a_queued_job_then_again(client, train_id):
    job = create(client, train_id).json()
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_pause_and_resume_a_queued_job_over_http(client, train_id):
    job_id = create(client, train_id).json()["id"]
    for _ in range(2):  # asked twice: paused once
        r = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
        assert r.status_code == 200 and r.json()["status"] == "paused" and r.json()["queue_position"] is None
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"status": "paused"}).json()["data"]] == [job_id]
    assert client.get("/v1/usage").json()["jobs"]["paused"] == 1
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["queue_position"] == 1
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_paused"
    assert "only a paused job can be resumed" in r.json()["error"]["message"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc"}).json()["data"]
    assert [e["data"] for e in events][-3:] == [{"status": "queued"}, {"status": "paused", "code": "paused"},
                                                {"status": "queued", "code": "resumed"}]
    client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert client.delete(f"/v1/files/{train_id}").status_code == 409  # a paused job still needs its file
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    assert client.post("/v1/fine_tuning/jobs/ftjob-none/pause").status_code == 404


def test_a_resume_is_refused_at_the_teams_max_queued_jobs(client, task_files):
    team = make_team(client, "pause-quota", max_queued_jobs=1)
    key = as_key(team["key"])
    file_id = upload(client, task_files[0], headers=key)["id"]
    body = {"model": "tiny-org/tiny-model", "training_file": file_id, "training": TRAINING}
    paused = client.post("/v1/fine_tuning/jobs", headers=key, json=body).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{paused}/pause", headers=key).json()["status"] == "paused"
    assert client.post("/v1/fine_tuning/jobs", headers=key, json=body).status_code == 200  # paused: not waiting
    r = client.post(f"/v1/fine_tuning/jobs/{paused}/resume", headers=key)
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert client.get(f"/v1/fine_tuning/jobs/{paused}", headers=key).json()["status"] == "paused"


def test_events_page_both_ways(client, train_id):
    job = create(client, train_id).json()
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    # Newest first.
    assert [e["data"] for e in events] == [{"status": "cancelled"}, {"status": "queued"}, {"code": "created"}]
    assert job["id"] in events[2]["message"]  # the creation event names the job
    assert {e["object"] for e in events} == {"fine_tuning.job.event"}
    page = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1, "after": events[0]["id"]}).json()
    assert [e["id"] for e in page["data"]] == [events[1]["id"]] and page["has_more"]
    forward = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                         params={"order": "asc", "after": events[2]["id"]}).json()
    assert [e["id"] for e in forward["data"]] == [events[1]["id"], events[0]["id"]]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": "x"}).status_code == 400


def test_checkpoints_of_a_new_job_and_unknown_ones(client, train_id):
    job = create(client, train_id).json()
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
    r = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/ftckpt-nope/content")
    assert r.status_code == 404 and r.json()["error"]["param"] == "checkpoint_id"


def test_a_file_in_use_cannot_be_deleted(client, train_id):
    job = create(client, train_id).json()
    r = client.delete(f"/v1/files/{train_id}")
    assert r.status_code == 409
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("file_in_use", "file_id")
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/files/{train_id}").status_code == 200


def test_health_ready_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/content" in paths


def test_readyz_reports_an_unreachable_broker(tmp_path):
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.service.support import make_settings

    settings = make_settings(tmp_path / "data", broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["database"] == "ok"
    assert r.json()["checks"]["broker"].startswith("error")


def test_an_unreachable_broker_neither_refuses_nor_strands_a_job(tmp_path, task_files):
    """Creating a job does not touch the broker; a dispatch that cannot send puts the job back in the
    queue, and the next pass with a broker that answers sends it."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from service.scheduler import dispatch_pass
    from tests.service.support import API_KEY, make_settings, sessions_for

    settings = make_settings(tmp_path / "data", broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        train_id = upload(c, task_files[0])["id"]
        r = create(c, train_id)
        assert r.status_code == 200 and r.json()["status"] == "queued"
        register_worker(settings)
        assert c.app.state.dispatcher.run_once() == []  # the send failed
        job = c.get(f"/v1/fine_tuning/jobs/{r.json()['id']}").json()
        assert (job["status"], job["queue_position"], job["worker"]) == ("queued", 1, None)
        events = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
        assert events[0]["data"] == {"status": "queued", "code": "send_failed", "worker": "test-worker"}
        assert c.app.state.dispatcher.run_once() == []  # backing off: no second try (and event) at once
        assert c.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"] == events
        sent = []
        assert [a.job_id for a in dispatch_pass(sessions_for(settings), settings, sent.append)] == [job["id"]]
