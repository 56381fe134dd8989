"""End to end, with a real `dpo-service api` process (SQLite, no worker): an internal error answers 500
with an error id, keeps the client's connection open and leaves its traceback in the log under that id;
and no key, sent in a query string, a header or a body, on good and erroring routes, reaches anything
the process writes (its stdout and stderr, every file in its data directory)."""
from __future__ import annotations

import re
import secrets
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from tests.service.processes import REPO, start_api
from tests.service.support import as_key, make_team

pytestmark = pytest.mark.slow
GOOD = b'{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}\n'
ADMIN_KEY = "operator-chosen-" + secrets.token_hex(16)  # not key-shaped: only its place in a request hides it


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    # Unbuffered: each line is in the log file once the response that it is about has arrived.
    service = start_api(tmp_path_factory.mktemp("api-logs"), ADMIN_KEY, {"PYTHONUNBUFFERED": "1"})
    yield service
    service.stop()


@pytest.fixture(scope="module")
def corrupt_file(api) -> str:
    """A file whose row the database holds corrupt (a size that is no number): listing files fails on it."""
    with api.client() as c:
        r = c.post("/v1/files", files={"file": ("t.jsonl", GOOD * 4)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    with sqlite3.connect(api.data_dir / "dpo.sqlite") as db:
        db.execute("UPDATE files SET bytes = 'not a number' WHERE id = ?", (r.json()["id"],))
    return r.json()["id"]


def _log(api) -> str:
    return (api.data_dir.parent / "api.log").read_text(errors="replace")


def _wait_for_log(api, *needles: str, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while not all(n in (text := _log(api)) for n in needles):
        assert time.monotonic() < deadline, f"{needles} not in the API log:\n{text[-3000:]}"
        time.sleep(0.1)
    return text


def _local_address(response: httpx.Response) -> tuple:
    return response.extensions["network_stream"].get_extra_info("client_addr")


def test_an_internal_error_keeps_the_connection_and_its_id_finds_the_traceback(api, corrupt_file):
    with api.client() as c:
        before = c.get("/healthz")
        r = c.get("/v1/files")
        after = c.get("/healthz")
        # One connection for all three: the server kept it open after the 500.
        assert _local_address(before) == _local_address(r) == _local_address(after)
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert re.fullmatch(r"err-[0-9a-f]{12}", error["error_id"]) and error["error_id"] in error["message"]
    for leak in ("Traceback", ".py", str(REPO), "ValidationError", str(api.data_dir)):
        assert leak not in r.text
    assert after.status_code == 200
    log = _wait_for_log(api, error["error_id"])
    entry = log[log.index(error["error_id"]):]
    assert "GET /v1/files" in entry[:200] and "Traceback" in entry and "FilePublic" in entry


def _requests_carrying(key: str, other: str) -> list[tuple[str, str, dict]]:
    """(method, url, httpx keywords): `key` in a query string, a header and a body, on routes that answer
    200, 400, 401, 404 and 500 (the corrupt file's list)."""
    return [
        ("GET", f"/v1/files?api_key={key}&limit=1", {"headers": as_key(key)}),  # 500 with a valid key
        ("GET", f"/v1/fine_tuning/jobs?api_key={key}", {"headers": as_key(key)}),
        ("GET", f"/v1/fine_tuning/jobs?key={key}&{key}", {}),  # 401, no header
        ("GET", f"/v1/fine_tuning/jobs?limit={key}", {"headers": as_key(other)}),  # 400 naming limit
        ("GET", f"/v1/fine_tuning/jobs/{key}/events?after={key}", {"headers": as_key(other)}),  # 404
        ("GET", f"/v1/files/{key}", {"headers": as_key(other)}),  # 404, the key as a path segment
        ("GET", "/v1/pool", {"headers": {"Authorization": f"Basic {key}", "X-Api-Key": key}}),  # 401
        ("GET", "/v1/pool", {"headers": {"Authorization": key}}),  # 401, no scheme
        ("GET", "/v1/pool", {"headers": as_key(key + "x")}),  # 401, a wrong key that holds the key
        ("POST", "/v1/fine_tuning/jobs", {"headers": as_key(key), "json": {
            "model": key, "training_file": key, "api_key": key, "training": {"loss": key}}}),  # 400
        ("POST", "/v1/fine_tuning/jobs", {"headers": as_key(other), "content": f'{{"api_key": "{key}",'}),  # 400
        ("POST", "/v1/admin/teams", {"headers": as_key(other), "json": {"name": 5, "api_key": key}}),
    ]


def test_no_key_reaches_any_log(api, corrupt_file):
    with api.client() as c:
        team_key = make_team(c, "logs")["key"]
        seen = []
        for key, other in ((ADMIN_KEY, team_key), (team_key, ADMIN_KEY)):
            for method, url, kwargs in _requests_carrying(key, other):
                seen.append(c.request(method, url, **kwargs).status_code)
        assert c.get("/healthz?last=1").status_code == 200
    assert {200, 400, 401, 404, 500} <= set(seen), seen
    # The access log has the requests (values withheld), up to the last one.
    written = {"api.log": _wait_for_log(api, "/v1/files?api_key=***&limit=***", "/healthz?last=***")}
    for path in Path(api.data_dir).rglob("*"):
        if path.is_file():
            written[str(path)] = path.read_bytes().decode("latin-1")
    assert "internal error err-" in written["api.log"]
    for key in (ADMIN_KEY, team_key):
        assert not [name for name, text in written.items() if key in text], key


def test_the_log_target_withholds_query_values_and_key_shaped_names():
    from api.logs import safe_target

    assert safe_target("/v1/files?api_key=abc&limit=5&order") == "/v1/files?api_key=***&limit=***&order"
    assert safe_target("/v1/files/dpo-sk-abc?dpo-sk-xyz&x%3Dy=1&Key=2") == "/v1/files/***?***&***=***&***=***"
    assert safe_target("/v1/files/My-Key-1/content") == "/v1/files/***/content"
    job = "/v1/fine_tuning/jobs/ftjob-01a23801e4678344cf839e6e/events"
    assert safe_target(job) == job
    assert safe_target("/v1/files/key-0abc", "key-0abc") == "/v1/files/***"  # the admin key, id-shaped


def test_the_internal_error_log_masks_keys_quoted_by_an_exception(caplog):
    """An exception whose message quotes the request (the caller's key, the admin key, another team's
    key) is logged with each of them masked."""
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from api.internal_errors import InternalErrors

    admin, other_team = "admin-" + secrets.token_hex(8), "dpo-sk-" + secrets.token_urlsafe(32)

    async def fail(scope, receive, send):
        raise ValueError(f"bad request from {scope['headers']!r} quoting {admin} and {other_team}")

    app = Starlette()
    app.mount("/", fail)
    app.add_middleware(InternalErrors, admin_key=lambda: admin)
    with caplog.at_level("ERROR", logger="dpo.api"), TestClient(app) as c:
        r = c.get("/x", headers={"Authorization": "Bearer caller-key-123"})
    assert r.status_code == 500
    text = caplog.text
    assert r.json()["error"]["error_id"] in text and "ValueError" in text
    for secret in ("caller-key-123", admin, other_team):
        assert secret not in text
