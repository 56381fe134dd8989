"""Fault injection into real processes: `dpo-service api` and `dpo-service worker` as separate OS processes
on the embedded defaults (SQLite, one data directory), and a Redis server of the test's own. A worker is
killed mid-job, another is stopped with SIGTERM, the API is killed and started again, the broker is
stopped and started again; each test then checks the job's final state, its events and its artifacts.

Leases, heartbeats and dispatch run on short intervals (DPO_JOB_LEASE_S=3, heartbeats every 0.5 s) so a
lost worker is noticed within seconds. The first four tests share one service and run in order."""
from __future__ import annotations

import io
import json
import secrets
import signal
import tarfile
import threading
import time

import httpx
import pytest

from tests.service.processes import RedisServer, start_service
from tests.service.support import as_key, make_team

pytestmark = pytest.mark.slow
FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 1}
ENV = {"DPO_WORKER_NAME": "w1", "DPO_WORKER_GPU_TYPE": "cpu", "DPO_WORKER_GPUS": "1", "DPO_JOB_LEASE_S": "3",
       "DPO_CANCEL_POLL_INTERVAL_S": "0.3"}
# A run to its end may take minutes on a loaded machine: waits for one fail when the job stops moving on.
STALL_S = 120


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("faults"), "faults-" + secrets.token_hex(16), ENV)
    yield svc
    svc.stop()


def submit(service, model, file_id, **training) -> str:
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": model, "training_file": file_id, "training": {**FAST, **training},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def events(service, job_id) -> list[dict]:
    out, after = [], None
    with service.client() as c:
        while True:
            params = {"order": "asc", "limit": 100, **({"after": after} if after else {})}
            page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
            out += page["data"]
            if not page["has_more"]:
                return out
            after = page["last_id"]


def statuses(log: list[dict]) -> list[str]:
    return [e["data"]["status"] for e in log if e["data"] and "status" in e["data"]]


def coded(log: list[dict], code: str) -> list[dict]:
    """The data of the events whose data.code is `code`, oldest first."""
    return [e["data"] for e in log if (e["data"] or {}).get("code") == code]


def resumed_from(log: list[dict]) -> list[int | None]:
    """Each run's start: the checkpoint step it resumed from (None: from the beginning)."""
    return [data["resumed_from_step"] for data in coded(log, "training_started")]


def checkpoints(service, job_id) -> list[dict]:
    with service.client() as c:
        return c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"]


def metric_steps(service, job: dict) -> list[int]:
    with service.client() as c:
        text = c.get(f"/v1/files/{job['result_files'][0]}/content").text
    return [json.loads(line)["step"] for line in text.splitlines() if "loss" in json.loads(line)]


def assert_no_partial_checkpoints(service, job_id) -> None:
    out = service.data_dir / "jobs" / job_id
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "a temporary checkpoint was left"


def test_a_worker_killed_mid_job_resumes_on_the_next_worker_from_its_latest_checkpoint(service, file_id,
                                                                                       tiny_model):
    # Long enough that the kill lands mid-run even on an idle machine, where the tiny model's steps are quick.
    # save_total_limit null: every checkpoint is kept, to see that each step was saved exactly once.
    job_id = submit(service, tiny_model, file_id, max_steps=96, save_steps=8, save_total_limit=None)
    job = service.wait_for_job(job_id, pred=lambda j: (j["progress"]["step"] or 0) >= 10 or j["status"] == "failed")
    assert job["status"] == "running", job
    service.kill("worker")  # SIGKILL to the worker and its job process, mid-training
    killed_at_step = service.wait_for_job(job_id, until=("queued", "running")).get("progress", {}).get("step")
    service.wait_for_job(job_id, until=("queued",))  # the lease ran out; no worker is left to take the job
    waiting = _gpu_seconds(service)
    time.sleep(2)  # the lost run ended at its last renewal: waiting for a worker costs the team nothing
    assert _gpu_seconds(service) == pytest.approx(waiting), "GPU-seconds grew while the job waited in the queue"
    service.add_worker("w2")

    job = service.wait_for_job(job_id, stall_s=STALL_S)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"
    log = events(service, job_id)
    assert statuses(log) == ["queued", "running", "queued", "running", "succeeded"]
    (lost,) = coded(log, "worker_lost")
    assert {k: lost[k] for k in ("status", "cause", "worker", "attempts", "max_attempts")} == {
        "status": "queued", "cause": "lease_expired", "worker": "w1", "attempts": 1, "max_attempts": 3}
    assert [(e["data"]["worker"], e["data"]["attempt"]) for e in log if (e["data"] or {}).get("status") == "running"] \
        == [("w1", 1), ("w2", 2)]
    first_start, step = resumed_from(log)
    assert first_start is None and step >= 8 and step % 8 == 0 and (killed_at_step is None or step <= killed_at_step)
    assert (job["attempts"], job["progress"]["step"], job["worker"]) == (2, 96, "w2")

    assert sorted(c["step_number"] for c in checkpoints(service, job_id) if not c["final"]) == list(range(8, 97, 8))
    assert metric_steps(service, job) == list(range(1, 97))  # the lost run's records after its checkpoint are gone
    assert_no_partial_checkpoints(service, job_id)
    with service.client() as c, c.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints/"
                                                 f"{job['fine_tuned_model']}/content") as r:
        assert r.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(r.read())) as tar:
            assert f"{job['fine_tuned_model']}/config.json" in tar.getnames()
    service.wait_for_worker("w1", "lost")
    service.wait_for_worker("w2", "idle")


def _gpu_seconds(service) -> float:
    with service.client() as c:
        return c.get("/v1/usage").json()["gpu_seconds"]


def test_sigterm_checkpoints_at_the_next_step_and_hands_the_job_back(service, file_id, tiny_model):
    job_id = submit(service, tiny_model, file_id, max_steps=400)  # no save_steps: only the hand-back checkpoints
    service.wait_for_job(job_id, pred=lambda j: (j["progress"]["step"] or 0) >= 3)
    service.procs["w2"].send_signal(signal.SIGTERM)  # the main process only, as `docker stop` sends it
    assert service.procs["w2"].wait(timeout=60) == 0
    service.wait_for_worker("w2", "stopped")
    job = service.wait_for_job(job_id, until=("queued",))
    step = job["progress"]["step"]
    assert 3 <= step < 400 and job["attempts"] == 0 and job["worker"] is None
    assert events(service, job_id)[-1]["data"] == {"status": "queued", "code": "handed_back", "handed_back": True,
                                                   "worker": "w2", "step": step}
    assert (service.data_dir / "jobs" / job_id / f"checkpoint-{step}" / "state.json").is_file()

    service.add_worker("w3")
    job = service.wait_for_job(job_id, stall_s=STALL_S)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"
    log = events(service, job_id)
    assert statuses(log) == ["queued", "running", "queued", "running", "succeeded"]
    assert resumed_from(log) == [None, step]
    assert (job["attempts"], job["progress"]["step"]) == (1, 400)
    assert metric_steps(service, job) == list(range(1, 401))


def test_restarting_the_api_loses_nothing(service, file_id, tiny_model):
    long = submit(service, tiny_model, file_id, max_steps=30)
    short = submit(service, tiny_model, file_id, max_steps=2)  # waits behind it for the one worker
    service.wait_for_job(long, pred=lambda j: (j["progress"]["step"] or 0) >= 2)
    with service.client() as c:
        before = {path: [x["id"] for x in c.get(path, params={"limit": 100}).json()["data"]]
                  for path in ("/v1/files", "/v1/fine_tuning/jobs")}
    polls = {"errors": 0, "ok": 0}
    stop = threading.Event()

    def poll():  # a client that keeps polling through the restart
        with service.client(timeout=2) as c:
            while not stop.is_set():
                try:
                    c.get(f"/v1/fine_tuning/jobs/{long}").raise_for_status()
                    polls["ok"] += 1
                except httpx.HTTPError:
                    polls["errors"] += 1
                time.sleep(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        service.kill("api")  # SIGKILL: no clean shutdown, its dispatcher thread dies mid-pass
        deadline = time.monotonic() + 60
        while polls["errors"] == 0:  # the client sees the API gone before it comes back
            assert time.monotonic() < deadline, "no poll failed while the API was down"
            time.sleep(0.1)
        service.start_api()
        service.wait_ready()
        assert service.wait_for_job(long, stall_s=STALL_S)["status"] == "succeeded", service.logs()
        assert service.wait_for_job(short, stall_s=STALL_S)["status"] == "succeeded", service.logs()
    finally:
        stop.set()
        poller.join()
    assert polls["errors"] > 0 and polls["ok"] > 0
    with service.client() as c:
        after = {path: [x["id"] for x in c.get(path, params={"limit": 100}).json()["data"]]
                 for path in ("/v1/files", "/v1/fine_tuning/jobs")}
    assert after["/v1/fine_tuning/jobs"] == before["/v1/fine_tuning/jobs"]
    assert set(before["/v1/files"]) <= set(after["/v1/files"])  # plus the two jobs' result files
    for job_id in (long, short):
        log = events(service, job_id)
        assert statuses(log) == ["queued", "running", "succeeded"]
        assert len({e["id"] for e in log}) == len(log)


def test_no_secret_reaches_a_log(service):
    with service.client() as c:
        team = make_team(c, "secrets")
        assert c.get("/v1/files", headers=as_key(team["key"])).status_code == 200
        wrong = "dpo-sk-" + secrets.token_urlsafe(32)
        assert c.get("/v1/files", headers=as_key(wrong)).status_code == 401
    logs = "".join(p.read_text(errors="replace") for p in service.data_dir.parent.glob("*.log"))
    assert "GET /v1/files" in logs  # the access log is there, and holds no key
    for secret in (service.key, team["key"], wrong):
        assert secret not in logs


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_the_api_takes_jobs_while_the_broker_is_down_and_they_run_when_it_is_back(redis, tmp_path, task_files,
                                                                                  tiny_model):
    env = {**ENV, "DPO_BROKER_URL": redis.url, "DPO_QUEUE": "faults"}
    svc = start_service(tmp_path / "svc", "broker-" + secrets.token_hex(16), env)
    try:
        with svc.client() as c:
            r = c.post("/v1/files", files={"file": ("t.jsonl", task_files[0].read_bytes())},
                       data={"purpose": "fine-tune"})
        file_id = r.json()["id"]
        running = submit(svc, tiny_model, file_id, max_steps=16)
        svc.wait_for_job(running, pred=lambda j: (j["progress"]["step"] or 0) >= 2)
        redis.stop()

        with svc.client() as c:
            assert c.get("/healthz").status_code == 200
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("error")
        waiting = submit(svc, tiny_model, file_id, max_steps=2)  # accepted, though nothing can be sent
        assert svc.wait_for_job(running, stall_s=STALL_S)["status"] == "succeeded", svc.logs()  # trains on
        deadline = time.monotonic() + 120  # a dispatch pass tries to send it, and puts it back
        while not coded(events(svc, waiting), "send_failed"):
            assert time.monotonic() < deadline, f"no send of the waiting job failed\n{svc.logs()}"
            time.sleep(0.3)
        with svc.client() as c:
            assert c.get(f"/v1/fine_tuning/jobs/{waiting}").json()["status"] == "queued"

        redis.start()  # the same port, empty: whatever it held is gone
        job = svc.wait_for_job(waiting, stall_s=STALL_S)
        assert job["status"] == "succeeded", f"{job['error']}\n{svc.logs()}"
        waited = statuses(events(svc, waiting))  # each failed send put it back: queued again, same status
        assert waited[-2:] == ["running", "succeeded"] and set(waited[:-2]) == {"queued"} and len(waited) >= 4
        assert statuses(events(svc, running)) == ["queued", "running", "succeeded"]
        with svc.client() as c:
            assert c.get("/readyz").status_code == 200
    finally:
        svc.stop()
