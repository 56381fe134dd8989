"""Outages of the production shape, with real processes: `dpo-service api` and `dpo-service worker` on a
PostgreSQL cluster and a Redis server of the test's own (tests.service.processes), which the tests stop
and start again on the same port and data. The database goes away for less than a lease while a job
trains, and while every route is called; the broker goes away while a job trains and another is
submitted; the worker is killed mid-job and restarted at once under its name.

Every outage is shorter than a lease (DPO_JOB_LEASE_S=30, renewed every 2 s). The tests share one
service and run in order (the last one kills the worker)."""
from __future__ import annotations

import re
import secrets
import threading
import time

import httpx
import pytest

from tests.service.processes import TERMINAL, WORKER, PostgresServer, RedisServer, start_service
from tests.service.support import as_key, make_team
from tests.service.test_event_stream import Reader
from tests.service.test_faults import FAST, STALL_S, checkpoints, coded, events, resumed_from, statuses, submit

pytestmark = pytest.mark.slow
LEASE_S = 30
OUTAGE_S = 10
# One torch thread: on a small machine shared with other work, a second one spinning for its turn makes
# the tiny model's steps several times slower, and the jobs' lengths here assume fast steps.
HEARTBEAT_S = 2
ENV = {"DPO_STREAM_HEARTBEAT_S": str(HEARTBEAT_S), "DPO_WORKER_NAME": "w1", "DPO_WORKER_GPU_TYPE": "cpu", "DPO_WORKER_GPUS": "1", "DPO_JOB_LEASE_S": str(LEASE_S),
       "DPO_WORKER_HEARTBEAT_INTERVAL_S": "2", "DPO_WORKER_LOST_AFTER_S": str(LEASE_S), "DPO_DISPATCH_TIMEOUT_S": "30",
       "DPO_CANCEL_POLL_INTERVAL_S": "0.5", "DPO_QUEUE": "outages", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer().init()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, postgres, redis):
    env = {**ENV, "DPO_DATABASE_URL": postgres.url, "DPO_BROKER_URL": redis.url}
    svc = start_service(tmp_path_factory.mktemp("outages"), "outages-" + secrets.token_hex(16), env)
    yield svc
    svc.stop()


def wait_until(condition, timeout_s: float, what: str, service) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s\n{service.logs()}"
        time.sleep(0.2)


def trained_steps(service, job_id: str) -> int:
    """The last step the trainer logged, from the job's metrics.jsonl (written by dpo_core, not the database)
    in the worker's scratch directory (worker.scratch), where the run writes it."""
    paths = list(service.data_dir.glob(f"scratch/*/{job_id}/output/{job_id}/metrics.jsonl"))
    steps = re.findall(rb'"step": (\d+)', paths[0].read_bytes()) if paths else []
    return int(steps[-1]) if steps else 0


def test_a_database_outage_shorter_than_the_lease_leaves_a_running_job_untouched(service, postgres, file_id,
                                                                                   tiny_model):
    steps, save, logged = 240, 40, 10
    job_id = submit(service, tiny_model, file_id, max_steps=steps, save_steps=save, logging_steps=logged,
                    save_total_limit=100)
    service.wait_for_job(job_id, pred=lambda j: (j["progress"]["step"] or 0) >= 1 or j["status"] in TERMINAL)
    stream = StreamInThread(service, job_id)  # a live event stream, open across the outage
    postgres.stop()
    try:
        with service.client() as c:  # a stream asked for meanwhile is refused, as any request is
            refused = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "database_unavailable")
        stopped, before = time.monotonic(), trained_steps(service, job_id)
        assert before < steps, "the job ended before the outage began"
        # The job process trains on (to its end, on a fast machine), its writes held, for the whole outage.
        wait_until(lambda: time.monotonic() - stopped >= OUTAGE_S and trained_steps(service, job_id) > before,
                   timeout_s=LEASE_S - 10, what="training went on while the database was away", service=service)
    finally:
        postgres.start()

    job = service.wait_for_job(job_id, stall_s=STALL_S)
    assert (job["status"], job["attempts"], job["error"]) == ("succeeded", 1, None), service.logs()
    log = events(service, job_id)
    assert statuses(log) == ["queued", "running", "succeeded"]
    assert not [e for e in log if e["level"] == "error"]
    # Every write held during the outage landed, in the order it was made.
    assert [e["data"]["step"] for e in log if e["type"] == "metrics" and "loss" in e["data"]] == \
        list(range(logged, steps + 1, logged))
    saved = [e["data"]["checkpoint"] for e in log if e["data"] and "checkpoint" in e["data"]]
    listed = checkpoints(service, job_id)
    assert sorted(c["step_number"] for c in listed if not c["final"]) == list(range(save, steps + 1, save))
    assert {c["id"] for c in listed if not c["final"]} == set(saved)
    assert [c["id"] for c in listed if c["final"]] == [job["fine_tuned_model"]]
    assert job["progress"]["step"] == steps
    # The stream rode the outage out (kept alive meanwhile), gave every event once, and ended after the last.
    stream.join(timeout=30)
    assert stream.reader.ended and [m[0] for m in stream.reader.messages] == [e["id"] for e in log]
    assert len(stream.reader.comments) >= OUTAGE_S // HEARTBEAT_S - 1


class StreamInThread(threading.Thread):
    """Reads a job's event stream to its end in the background."""

    def __init__(self, service, job_id: str):
        super().__init__(daemon=True)
        self.client = service.client(timeout=LEASE_S)
        self.reader = Reader(self.client, job_id)
        self.start()

    def run(self) -> None:
        try:
            while self.reader.next_message() is not None:
                pass
        finally:
            self.reader.close()
            self.client.close()


def test_a_broker_outage_leaves_a_running_job_untouched_and_a_job_sent_meanwhile_starts_once_it_is_back(
        service, redis, file_id, tiny_model):
    running = submit(service, tiny_model, file_id, max_steps=120, logging_steps=10)
    service.wait_for_job(running, pred=lambda j: (j["progress"]["step"] or 0) >= 1 or j["status"] in TERMINAL)
    redis.stop()
    waiting = submit(service, tiny_model, file_id, max_steps=4)
    job = service.wait_for_job(running, stall_s=STALL_S)
    assert (job["status"], job["attempts"]) == ("succeeded", 1), service.logs()
    assert statuses(events(service, running)) == ["queued", "running", "succeeded"]
    # Each pass that could not send it put it back: queued again.
    wait_until(lambda: coded(events(service, waiting), "send_failed"), timeout_s=60,
               what="a dispatch pass tried to send the job", service=service)
    with service.client() as c:
        assert c.get(f"/v1/fine_tuning/jobs/{waiting}").json()["status"] == "queued"

    redis.start()
    job = service.wait_for_job(waiting, stall_s=STALL_S)
    assert (job["status"], job["attempts"]) == ("succeeded", 1), service.logs()


# Bodies for the routes that take one, by (method, path) as the OpenAPI schema names them.
BODIES = {
    # A GPU type no worker has: the job waits in the queue, and the worker stays free for the next test.
    ("post", "/v1/fine_tuning/jobs"): lambda ids: {"model": ids["model"], "training_file": ids["file_id"],
                                                   "training": {**FAST, "max_steps": 1}, "gpu_type": "none-here"},
    ("post", "/v1/fine_tuning/jobs/preflight"): lambda ids: {"model": ids["model"], "training_file": ids["file_id"],
                                                             "training": {**FAST, "max_steps": 1}},
    ("post", "/v1/admin/teams"): lambda ids: {"name": "outage-" + secrets.token_hex(3)},
    ("patch", "/v1/admin/teams/{team_id}"): lambda ids: {"max_queued_jobs": 50},
    ("post", "/v1/admin/teams/{team_id}/keys"): lambda ids: {"name": "outage"},
    ("post", "/v1/webhooks"): lambda ids: {"url": "http://127.0.0.1:9/hook", "events": ["fine_tuning.job.failed"]},
}


def every_route(schema: dict, ids: dict, upload: bytes) -> list[tuple[str, str, dict]]:
    """(method, url, httpx arguments) for every operation the schema lists, deletions last."""
    calls = []
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            if path == "/v1/files" and method == "post":
                args = {"files": {"file": ("outage.jsonl", upload)}, "data": {"purpose": "fine-tune"}}
            elif "requestBody" in op:
                assert (method, path) in BODIES, f"give {method.upper()} {path} a body in BODIES"
                args = {"json": BODIES[(method, path)](ids)}
            else:
                args = {}
            calls.append((method, path.format(**ids), args))
    # A team's key before its team: the team may go only once it has no key.
    return sorted(calls, key=lambda c: (c[0] == "delete", c[0] == "delete" and "/keys/" not in c[1]))


def test_every_route_answers_503_while_the_database_is_down_and_answers_again_once_it_is_back(
        service, postgres, task_files, tiny_model):
    upload = task_files[0].read_bytes()
    with service.client() as c:
        team = make_team(c, "outage")
        extra_key = c.post(f"/v1/admin/teams/{team['id']}/keys", json={"name": "to-delete"}).json()["id"]
        own_file = c.post("/v1/files", files={"file": ("t.jsonl", upload)}, data={"purpose": "fine-tune"}).json()["id"]
        webhook = c.post("/v1/webhooks", json=BODIES[("post", "/v1/webhooks")]({})).json()["id"]
        schema = c.get("/openapi.json").json()
    job_id = submit(service, tiny_model, own_file, max_steps=2, save_steps=1)
    job = service.wait_for_job(job_id)
    assert job["status"] == "succeeded", service.logs()
    ids = dict(file_id=own_file, fine_tuning_job_id=job_id, checkpoint_id=job["fine_tuned_model"],
               team_id=team["id"], key_id=extra_key, webhook_id=webhook, model=tiny_model)
    calls = every_route(schema, ids, upload)
    keys = {"admin": service.key, "team": team["key"]}

    postgres.stop()
    try:
        for who, key in keys.items():
            with httpx.Client(base_url=service.url, headers=as_key(key), timeout=30) as c:  # one kept-alive connection
                for method, url, args in calls:
                    r = c.request(method, url, **args)  # a dropped connection raises here
                    what = f"{method.upper()} {url} ({who} key)"
                    if url == "/healthz":
                        assert r.status_code == 200, what
                        continue
                    assert r.status_code == 503, f"{what}: {r.status_code} {r.text}"
                    assert int(r.headers["Retry-After"]) > 0, what
                    if method == "head":  # the same answer without its body
                        continue
                    if url == "/readyz":
                        assert r.json()["checks"]["database"] != "ok", what
                    else:
                        assert r.json()["error"]["code"] == "database_unavailable", what
    finally:
        postgres.start()

    wait_until(lambda: httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200, timeout_s=20,
               what="ready again", service=service)
    for who, key in keys.items():
        with httpx.Client(base_url=service.url, headers=as_key(key), timeout=30) as c:
            for method, url, args in calls:
                if who == "admin" or method in ("get", "head"):  # the admin's deletions come last of all
                    r = c.request(method, url, **args)
                    assert r.status_code < 500, f"{method.upper()} {url} ({who} key): {r.status_code} {r.text}"
                    reads = method in ("get", "head")
                    assert who == "team" or not reads or r.status_code == 200, f"{url}: {r.status_code}"


def test_a_worker_killed_mid_job_comes_back_under_its_name_at_once_and_its_job_resumes(service, file_id, tiny_model):
    job_id = submit(service, tiny_model, file_id, max_steps=80, save_steps=10, logging_steps=10)
    service.wait_for_job(job_id, pred=lambda j: bool(checkpoints(service, j["id"])) or j["status"] in TERMINAL)
    service.kill("worker")  # SIGKILL to the worker and its job process, mid-training
    service.start("worker", WORKER)  # restarted at once, as a supervisor would, under the same DPO_WORKER_NAME

    def requeued() -> bool:
        assert service.procs["worker"].poll() is None, f"the restarted worker exited\n{service.logs()}"
        return "queued" in statuses(events(service, job_id))[2:]
    wait_until(requeued, timeout_s=2 * LEASE_S, what="the job was queued again", service=service)
    # Taken back when the worker came back under its name, not when its lease ran out (LEASE_S after the kill).
    (lost,) = coded(events(service, job_id), "worker_lost")
    assert (lost["status"], lost["cause"], lost["worker"], lost["attempts"]) == ("queued", "worker_restarted", "w1", 1)

    job = service.wait_for_job(job_id, stall_s=STALL_S)
    assert (job["status"], job["attempts"], job["worker"]) == ("succeeded", 2, "w1"), service.logs()
    log = events(service, job_id)
    assert statuses(log) == ["queued", "running", "queued", "running", "succeeded"]
    first_start, step = resumed_from(log)
    assert first_start is None and step >= 10 and step % 10 == 0
    assert service.wait_for_worker("w1", "idle")["state"] == "idle"
