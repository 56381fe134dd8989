"""End-to-end: webhooks from a real API process and a real worker to a real HTTP receiver on 127.0.0.1,
which checks every signature with standardwebhooks itself. The tests share one service and one receiver."""
from __future__ import annotations

import secrets
import time

import pytest

from tests.service.processes import start_service
from tests.service.receiver import Receiver
from tests.service.support import as_key, make_team

pytestmark = pytest.mark.slow
FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 2}
CHECKPOINT, SUCCEEDED = "fine_tuning.job.checkpoint.created", "fine_tuning.job.succeeded"
FAILED, CANCELLED = "fine_tuning.job.failed", "fine_tuning.job.cancelled"


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    env = {"DPO_WORKER_GPU_TYPE": "cpu", "DPO_WORKER_GPUS": "1", "DPO_WEBHOOK_RETRY_BASE_S": "0.5",
           "DPO_WEBHOOK_POLL_INTERVAL_S": "0.2"}
    svc = start_service(tmp_path_factory.mktemp("webhooks"), "e2e-" + secrets.token_hex(8), env)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def admin(service):
    with service.client() as c:
        yield c


def hook(admin, receiver, team, path: str, events: list[str], secret: str | None = None) -> dict:
    body = {"url": receiver.url + path, "events": events, **({"secret": secret} if secret else {})}
    r = admin.post("/v1/webhooks", headers=as_key(team["key"]), json=body)
    assert r.status_code == 200, r.text
    receiver.secrets[path] = r.json()["secret"]
    return r.json()


def submit(admin, team, file_id, model, **training) -> dict:
    r = admin.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]),
                   json={"model": model, "training_file": file_id, "training": {**FAST, **training},
                         "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
    assert r.status_code == 200, r.text
    return r.json()


def upload(admin, team, path) -> str:
    r = admin.post("/v1/files", headers=as_key(team["key"]), files={"file": (path.name, path.read_bytes())},
                   data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def settled(admin, team, webhook_id: str, timeout_s: float = 60) -> list[dict]:
    """The webhook's deliveries, once none is pending (a receiver records a delivery before the sender
    hears its answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        shown = admin.get(f"/v1/webhooks/{webhook_id}/deliveries", headers=as_key(team["key"])).json()["data"]
        if shown and all(d["status"] != "pending" for d in shown):
            return shown
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)


def test_a_job_delivers_what_each_webhook_asked_for(service, admin, receiver, task_files, tiny_model):
    a, b = make_team(admin, "hooks-a"), make_team(admin, "hooks-b")
    wanted = hook(admin, receiver, a, "/a/progress", [CHECKPOINT, SUCCEEDED])
    hook(admin, receiver, a, "/a/problems", [FAILED, CANCELLED], secret="an-own-secret-of-32-characters-or-more")
    theirs = hook(admin, receiver, b, "/b/all", [CHECKPOINT, SUCCEEDED, FAILED, CANCELLED])
    job = submit(admin, a, upload(admin, a, task_files[0]), tiny_model, max_steps=4, save_steps=2)
    done = service.wait_for_job(job["id"])
    assert done["status"] == "succeeded", f"{done['error']}\n{service.logs()}"

    checkpoints = admin.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=as_key(a["key"])).json()["data"]
    got = receiver.wait_for("/a/progress", count=len(checkpoints) + 1)  # deliveries run concurrently: any order
    assert all(r["verified"] for r in got) and len({r["id"] for r in got}) == len(got)
    by_type: dict[str, list[dict]] = {}
    for r in got:
        by_type.setdefault(r["event"]["type"], []).append(r["event"])
    assert set(by_type) == {CHECKPOINT, SUCCEEDED} and len(by_type[SUCCEEDED]) == 1
    assert {e["data"]["checkpoint"]["id"] for e in by_type[CHECKPOINT]} == {c["id"] for c in checkpoints}
    assert {e["data"]["checkpoint"]["step_number"] for e in by_type[CHECKPOINT]} == {2, 4}
    succeeded = by_type[SUCCEEDED][0]
    assert succeeded["object"] == "event" and succeeded["data"] == {
        "id": job["id"], "status": "succeeded", "fine_tuned_model": done["fine_tuned_model"], "error": None}
    assert receiver.events("/a/problems") == [] and receiver.events("/b/all") == []

    shown = settled(admin, a, wanted["id"])
    assert sorted(d["id"] for d in shown) == sorted(r["id"] for r in got)
    for d in shown:
        assert d["status"] == "delivered" and d["next_attempt_at"] is None
        assert [(t["status_code"], t["response"], t["error"]) for t in d["attempts"]] == [(200, "ok", None)]

    # Another team sees none of it, and its own webhook got nothing of A's job.
    for url in (f"/v1/webhooks/{wanted['id']}", f"/v1/webhooks/{wanted['id']}/deliveries"):
        assert admin.get(url, headers=as_key(b["key"])).status_code == 404
    listed = admin.get("/v1/webhooks", headers=as_key(b["key"])).json()["data"]
    assert [w["id"] for w in listed] == [theirs["id"]]


def test_a_cancelled_job_is_delivered_after_a_failed_attempt(service, admin, receiver, task_files, tiny_model):
    a = make_team(admin, "hooks-retry", max_running_jobs=0)  # its job waits: cancelled by the API, not the worker
    receiver.script["/retry"] = [500]
    flaky = hook(admin, receiver, a, "/retry", [CANCELLED, SUCCEEDED])
    job = submit(admin, a, upload(admin, a, task_files[0]), tiny_model, max_steps=100_000)
    r = admin.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=as_key(a["key"]))
    assert r.status_code == 200, r.text
    assert service.wait_for_job(job["id"])["status"] == "cancelled"

    [delivery] = settled(admin, a, flaky["id"])
    assert delivery["event_type"] == CANCELLED and delivery["job_id"] == job["id"]
    assert [(t["status_code"], t["response"]) for t in delivery["attempts"]] == [(500, "try again later"), (200, "ok")]
    assert delivery["attempts"][1]["at"] >= delivery["attempts"][0]["at"]
    got = receiver.events("/retry")
    assert [(r["id"], r["verified"], r["event"]["type"]) for r in got] == [(delivery["id"], True, CANCELLED)] * 2
    assert got[0]["event"]["data"] == {"id": job["id"], "status": "cancelled", "fine_tuned_model": None,
                                       "error": None}
