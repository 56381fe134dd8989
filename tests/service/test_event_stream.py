"""End-to-end: live event streams (`GET /v1/fine_tuning/jobs/{id}/events?stream=true`) from a real API
process while a real worker runs a tiny job, on the embedded defaults and on PostgreSQL + Redis. The
stream is read off the wire as the SSE text it is: a client reads part of a running job's events,
disconnects, resumes with Last-Event-ID, and has every event of the job exactly once, in order, as the
list route shows them; the stream ends after the job's final event."""
from __future__ import annotations

import json
import secrets
import signal
import time

import httpx
import pytest

from tests.service.processes import start_service
from tests.service.support import as_key, make_team

pytestmark = pytest.mark.slow
HEARTBEAT_S = 0.4
TRAINING = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
            "logging_steps": 1}


@pytest.fixture(scope="module", params=[
    "embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def service(request, tmp_path_factory):
    env = {"DPO_STREAM_HEARTBEAT_S": str(HEARTBEAT_S)}
    if request.param == "postgres+redis":
        env |= {"DPO_DATABASE_URL": request.getfixturevalue("postgres_url"), **request.getfixturevalue("redis_env")}
    svc = start_service(tmp_path_factory.mktemp(request.param.replace("+", "-")), "sse-" + secrets.token_hex(8), env)
    yield svc
    svc.stop()


class Reader:
    """An open stream, read line by line as SSE: `messages` holds (id, event, data) per message in
    arrival order, `comments` the comment lines; `ended` once the server closed the stream."""

    def __init__(self, client: httpx.Client, job_id: str, **kw):
        self.cm = client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true",
                                **kw.pop("params", {})}, **kw)
        self.response = self.cm.__enter__()
        assert self.response.status_code == 200, self.response.read()
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self.lines = self.response.iter_lines()
        self.messages: list[tuple[str, str, dict]] = []
        self.comments: list[str] = []
        self.ended = False

    def next_message(self) -> tuple[str, str, dict] | None:
        """The next message (None when the stream ended); comments are kept on the way."""
        fields: dict[str, str] = {}
        for line in self.lines:
            if line.startswith(":"):
                self.comments.append(line)
            elif line:
                name, _, value = line.partition(": ")
                assert name not in fields, f"field {name} twice in one message"
                fields[name] = value
            elif fields:
                message = (fields["id"], fields["event"], json.loads(fields["data"]))
                self.messages.append(message)
                return message
        self.ended = True
        return None

    def until(self, pred) -> None:
        while (message := self.next_message()) is not None:
            if pred(message):
                return
        raise AssertionError(f"the stream ended before the awaited event; got {[m[2]['message'] for m in self.messages]}")

    def close(self) -> None:
        self.cm.__exit__(None, None, None)


def create_job(service, model: str, file_id: str, **training) -> str:
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id,
                                                 "training": {**TRAINING, **training}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def all_events(service, job_id: str) -> list[dict]:
    """The job's events from the list route, oldest first."""
    out, after = [], None
    with service.client() as c:
        while True:
            page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                         params={"order": "asc", "limit": 100, **({"after": after} if after else {})}).json()
            out += page["data"]
            if not page["has_more"]:
                return out
            after = page["data"][-1]["id"]


def test_a_client_reconnects_with_last_event_id_and_misses_nothing(service, file_id, tiny_model):
    job_id = create_job(service, tiny_model, file_id, max_steps=30)  # still running when the client is back
    with service.client(timeout=60) as c:
        first = Reader(c, job_id)
        first.until(lambda m: m[1] == "metrics")  # mid-job: training has begun
        first.close()
        # Events keep coming while the client is away.
        step = first.messages[-1][2]["data"]["step"]
        job = service.wait_for_job(job_id, pred=lambda j: (j["progress"]["step"] or 0) >= step + 1
                                   or j["status"] != "running")
        assert job["status"] == "running", "the job ended before the client came back"
        second = Reader(c, job_id, headers={"Last-Event-ID": first.messages[-1][0]})
        while second.next_message() is not None:
            pass
        second.close()
    events = all_events(service, job_id)
    assert events[-1]["data"] == {"status": "succeeded"}, events[-1]
    streamed = first.messages + second.messages
    assert [m[0] for m in streamed] == [e["id"] for e in events]  # no gap, no duplicate, in order
    assert [m[2] for m in streamed] == events  # each data line is the event as the list route shows it
    assert [m[1] for m in streamed] == [e["type"] for e in events]
    assert second.ended and second.messages[-1][2]["data"]["status"] == "succeeded"

    # `after` resumes the same way; after the final event, a stream of a finished job ends at once.
    with service.client() as c:
        third = Reader(c, job_id, params={"after": events[-4]["id"]})
        while third.next_message() is not None:
            pass
        assert [m[0] for m in third.messages] == [e["id"] for e in events[-3:]]
        last = Reader(c, job_id, headers={"Last-Event-ID": events[-1]["id"]})
        assert last.next_message() is None and last.messages == []


def test_an_idle_stream_gets_keep_alives_and_ends_with_the_job(service, file_id, tiny_model):
    """A job that waits (a GPU type no worker has) sends no event for a while: the stream sends a comment
    every DPO_STREAM_HEARTBEAT_S meanwhile, and ends after the job's final event (its cancel)."""
    with service.client(timeout=60) as c:
        r = c.post("/v1/fine_tuning/jobs", json={"model": tiny_model, "training_file": file_id,
                                                 "training": TRAINING, "gpu_type": "none-here"})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        reader = Reader(c, job_id)
        reader.until(lambda m: m[2]["data"] == {"status": "queued"})
        started = time.monotonic()
        line = next(reader.lines)  # nothing happens to the job: the next line is a keep-alive
        waited = time.monotonic() - started
        assert line == ": keep-alive" and waited < 20 * HEARTBEAT_S, (line, waited)
        assert c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
        while reader.next_message() is not None:
            pass
        reader.close()
    assert reader.ended and reader.messages[-1][2]["data"] == {"status": "cancelled"}


def test_stream_errors_are_json_before_it_starts(service, file_id, tiny_model):
    job_id = create_job(service, "no-such-org/missing-model", file_id, max_steps=1)
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    with service.client() as c:
        team = make_team(c, "sse-" + secrets.token_hex(3))
        other = c.get(url, params={"stream": "true"}, headers=as_key(team["key"]))
        bad_after = c.get(url, params={"stream": "true", "after": "ftevent-0123456789abcdef01234567"})
        bad_header = c.get(url, params={"stream": "true"}, headers={"Last-Event-ID": "ftevent-nope"})
        no_key = httpx.get(f"{service.url}{url}", params={"stream": "true"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert bad_after.status_code == 400 and bad_after.json()["error"]["param"] == "after"
    assert bad_header.status_code == 400 and bad_header.json()["error"]["param"] == "Last-Event-ID"
    assert no_key.status_code == 401


def test_the_server_shutting_down_ends_open_streams(service, file_id, tiny_model):
    """Last in the module: it stops the API. uvicorn waits for open connections before it stops."""
    job_id = create_job(service, tiny_model, file_id, max_steps=100_000)
    with service.client(timeout=30) as c:
        reader = Reader(c, job_id)
        reader.until(lambda m: (m[2]["data"] or {}).get("status") == "queued")
        service.kill("worker")  # nothing left for it to do: the job's fate does not matter here
        service.signal("api", signal.SIGTERM)
        started = time.monotonic()
        while reader.next_message() is not None:
            pass
        assert time.monotonic() - started < 10
    service.procs["api"].wait(timeout=20)
