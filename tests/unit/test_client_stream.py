"""The `dpo` client's event-stream reader against a scripted local HTTP server: a stream cut mid-job is
taken up again after the last event received (Last-Event-ID), a 503 is waited out, a 404 is not.
The real service's stream is exercised end to end in tests/service/test_client_cli.py."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from dpo_client.api import Api
from dpo_client.config import Target
from dpo_client.errors import ClientError
from dpo_client.stream import follow_events

JOB = "ftjob-0123456789abcdef01234567"


def event(n: int) -> dict:
    return {"id": f"ftevent-{n:024x}", "object": "fine_tuning.job.event", "created_at": 1, "level": "info",
            "type": "message", "message": f"event {n}", "data": None}


class Script:
    """What the server answers: one entry per stream request, in order; and what it was asked."""

    def __init__(self, answers: list):
        self.answers, self.cursors, self.status = answers, [], "running"
        self.listing: list[int] | None = None  # event numbers, for a service that answers the list


def serve(script: Script) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes: a cut stream

        def log_message(self, *args):
            pass

        def do_GET(self):
            if "/events" not in self.path:
                return self._json(200, {"id": JOB, "status": script.status})
            if script.listing is not None:
                return self._list()
            script.cursors.append(self.headers.get("Last-Event-ID"))
            answer = script.answers.pop(0)
            if isinstance(answer, int):
                return self._json(answer, {"error": {"message": "try later", "code": "x"}})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b": keep-alive\n\n")
            for n in answer:
                self.wfile.write(f"id: {event(n)['id']}\nevent: message\ndata: {json.dumps(event(n))}\n\n".encode())
            if not script.answers:
                script.status = "succeeded"

        def _list(self):
            """A service without streams: the list route's answer, `stream` ignored."""
            query = parse_qs(urlsplit(self.path).query)
            script.cursors.append(query.get("after", [None])[0])
            start = next((i + 1 for i, n in enumerate(script.listing) if event(n)["id"] == script.cursors[-1]), 0)
            page = [event(n) for n in script.listing[start:start + 2]]
            if "stream" not in query and len(script.cursors) == 3:
                script.listing.append(3)  # a new event while the client follows
                script.status = "succeeded"
            self._json(200, {"object": "list", "data": page, "has_more": start + 2 < len(script.listing)})

        def _json(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def api_for():
    servers = []

    def make(script: Script) -> Api:
        servers.append(serve(script))
        return Api(Target(f"http://127.0.0.1:{servers[-1].server_port}", "k", "test"))

    yield make
    for server in servers:
        server.shutdown()


def test_a_cut_stream_resumes_after_the_last_event_and_ends_with_the_job(api_for):
    script = Script([[1, 2], 503, [3], [4]])
    retries = []
    got = [e["message"] for e in follow_events(api_for(script), JOB, on_retry=lambda err, wait: retries.append(wait))]
    assert got == ["event 1", "event 2", "event 3", "event 4"]
    assert script.cursors == [None, event(2)["id"], event(2)["id"], event(3)["id"]]
    assert len(retries) == 1  # the 503; a stream that ended while the job ran is simply opened again


def test_a_stream_resumes_from_the_given_cursor(api_for):
    script = Script([[5]])
    assert [e["id"] for e in follow_events(api_for(script), JOB, after=event(4)["id"])] == [event(5)["id"]]
    assert script.cursors == [event(4)["id"]]


def test_a_client_error_is_not_retried(api_for):
    with pytest.raises(ClientError) as err:
        list(follow_events(api_for(Script([404])), JOB))
    assert err.value.status == 404 and err.value.code == "x"


def test_a_service_without_streams_is_followed_by_paging_its_list(api_for):
    script = Script([])
    script.listing = [1, 2]
    assert [e["message"] for e in follow_events(api_for(script), JOB)] == ["event 1", "event 2", "event 3"]
