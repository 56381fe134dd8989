"""Property-based: every path, query and header parameter of every route, as the OpenAPI schema lists
them, takes hostile values (the known killers below, then random ids, cursors, numbers and strings)
with a team's key and with the admin key, on SQLite and on PostgreSQL (which refuses NUL bytes and
out-of-range integers where SQLite does not). One parameter is bad at a time, the others name the
caller's own objects. No answer may be a 5xx, and a 400 or 404 names the parameter (`param`)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from api.main import create_app
from service.artifacts import make_storage
from service.db.jobs import add_checkpoint, add_event
from tests.service.support import API_KEY, as_key, fresh_postgres, make_settings, make_team, sessions_for

SCHEMA = create_app(make_settings(Path("/nonexistent/schema-only"))).openapi()
PARAMETERS = [(method.upper(), path, p["name"], p["in"]) for path, operations in SCHEMA["paths"].items()
              for method, operation in operations.items() for p in operation.get("parameters", [])]
GOOD = b'{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}\n'
TRAINING = {"max_length": 64, "max_prompt_length": 32}
PREFIXES = ("ftjob", "file", "ftckpt", "ftevent", "team", "key", "wh", "whevt")
BIG = ("9223372036854775808", "9" * 30, "9" * 5000)  # past int64; past Python's 4,300-digit int() limit
KILLERS = [
    *BIG, "-9223372036854775809", "-1", "0", "1.5", "1e308", "1e309", "-1e309", "nan", "²", "", "../x", "..",
    "a\x00b", "%00", "\n", "é中🙂", "a" * 5000, *(f"{prefix}-{tail}" for prefix in PREFIXES for tail in (BIG[0], BIG[2])),
]
# Random values: text, id-shaped strings with any tail, and numbers of any size written as text.
VALUES = st.one_of(
    st.text(max_size=80),
    st.builds(lambda p, t: f"{p}-{t}", st.sampled_from(PREFIXES), st.text(max_size=70) | st.integers().map(str)),
    st.integers().map(str),
    st.integers(min_value=-(10 ** 40), max_value=10 ** 40).map(str),
    st.floats().map(str),
)


@dataclass
class Caller:
    key: str
    valid: dict[str, str]  # a value of each path parameter that names one of the caller's own objects
    file_id: str


def _objects(client, app_settings, key: str) -> dict[str, str]:
    """A file, a job with an event and a checkpoint, a webhook, all of the key's team."""
    file_id = client.post("/v1/files", files={"file": ("t.jsonl", GOOD * 4)}, data={"purpose": "fine-tune"},
                          headers=as_key(key)).json()["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=as_key(key),
                    json={"model": "owner/tiny-model", "training_file": file_id, "training": TRAINING})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    with sessions_for(app_settings).begin() as s:
        add_event(s, job_id, "Step 1/1", type="metrics", data={"step": 1})
        checkpoint = add_checkpoint(s, job_id, 1, f"jobs/{job_id}/checkpoint-1", {"step": 1})
        s.flush()
        checkpoint_id = checkpoint.id
    # Its files are in the store, so its content route reads what the Range headers ask for.
    written = app_settings.data_dir / "written" / checkpoint_id
    written.mkdir(parents=True)
    (written / "config.json").write_text("{}")
    make_storage(app_settings).publish_dir(written, f"jobs/{job_id}/checkpoint-1", checkpoint_id)
    webhook = client.post("/v1/webhooks", headers=as_key(key),
                          json={"url": "http://127.0.0.1:9/hook", "events": ["fine_tuning.job.succeeded"]})
    assert webhook.status_code == 200, webhook.text
    # Cancelled: a stream of its events (`stream` fuzzed to a true value) ends after them, where a job
    # that no worker runs would keep it open.
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=as_key(key)).status_code == 200
    return {"file_id": file_id, "fine_tuning_job_id": job_id, "checkpoint_id": checkpoint_id,
            "webhook_id": webhook.json()["id"]}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def world(request, tmp_path_factory):
    """The app, and a team's key and the admin key, each with objects of its own team."""
    data_dir = tmp_path_factory.mktemp("param-fuzz") / "data"
    with fresh_postgres() if request.param == "postgres" else nullcontext() as url:
        app_settings = make_settings(data_dir, **({"database_url": url} if url else {}))
        with TestClient(create_app(app_settings), headers=as_key(API_KEY)) as client:
            team = make_team(client, "fuzz")
            admin_ids = {"team_id": team["id"], "key_id": team["key_id"]}
            admin = _objects(client, app_settings, API_KEY) | admin_ids
            own = _objects(client, app_settings, team["key"]) | admin_ids  # the admin routes answer it 403
            yield client, {"team": Caller(team["key"], own, own["file_id"]),
                           "admin": Caller(API_KEY, admin, admin["file_id"])}


def _request(client, caller: Caller, method: str, path: str, name: str, where: str, value: str):
    url, params, headers = path, {}, dict(as_key(caller.key))
    for other, own in caller.valid.items():
        url = url.replace(f"{{{other}}}", quote(own, safe="")) if other != name else url
    if where == "path":
        url = url.replace(f"{{{name}}}", quote(value, safe=""))
    elif where == "query":
        params[name] = value
    else:  # header: raw bytes, as a client that does not check them sends them
        headers[name] = value.encode("utf-8")
    body = {"model": "owner/tiny-model", "training_file": caller.file_id, "training": TRAINING} \
        if (method, path) == ("POST", "/v1/fine_tuning/jobs") else ({} if method == "PATCH" else None)
    return client.request(method, url, params=params, headers=headers, json=body)


def _names_the_parameter(where: str, value: str) -> bool:
    """A 400 or 404 must name the parameter, unless the value changed which route the URL is (a path
    value that is empty, holds a slash or is a dot segment)."""
    return where != "path" or not (value in ("", ".", "..") or "/" in value)


@pytest.mark.parametrize("who", ["team", "admin"])
@pytest.mark.parametrize("method, path, name, where", PARAMETERS, ids=[f"{m} {p} {n}" for m, p, n, _ in PARAMETERS])
def test_a_hostile_parameter_gets_a_4xx_that_names_it(world, who, method, path, name, where):
    client, callers = world
    caller = callers[who]

    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(value=VALUES)
    def check(value: str) -> None:
        if method == "DELETE" and not _names_the_parameter(where, value):
            return  # `..` makes it a DELETE of the parent (the job): a real deletion, not a hostile value
        r = _request(client, caller, method, path, name, where, value)
        assert r.status_code < 500, f"{method} {path} {name}={value[:60]!r}: {r.status_code} {r.text[:300]}"
        # A HEAD answer has no body to name it in: its status is checked, its GET twin names it.
        if r.status_code in (400, 404) and _names_the_parameter(where, value) and method != "HEAD":
            assert r.json()["error"]["param"] == name, f"{name}={value[:60]!r}: {r.text[:300]}"

    for killer in KILLERS:
        check = example(value=killer)(check)
    check()
