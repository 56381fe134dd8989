"""The isolation walk: every /v1 route of the app, called with team B's key on team A's objects.

Routes are enumerated from the app itself, and each must be listed in ROUTES with what a foreign
team gets, so a new route fails the walk until someone decides (and checks) how it is isolated.
Shared by the in-process test (SQLite) and the end-to-end ones (real processes, PostgreSQL + Redis).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

OBJECT = "object"  # names one of A's objects in its path: 404, the same as an id that does not exist
LIST = "list"  # lists only B's own objects; paging after one of A's ids is refused like an unknown id
CREATE = "create"  # makes B's own object; naming one of A's files in it is refused like an unknown id
OWN_VIEW = "own view"  # B's own slice of a shared view: none of A's ids appear
ADMIN = "admin"  # the admin key only: 403

ROUTES = {
    ("POST", "/v1/files"): CREATE,
    ("GET", "/v1/files"): LIST,
    ("GET", "/v1/files/{file_id}"): OBJECT,
    ("GET", "/v1/files/{file_id}/content"): OBJECT,
    ("HEAD", "/v1/files/{file_id}/content"): OBJECT,
    ("POST", "/v1/files/{file_id}/content/url"): OBJECT,
    ("DELETE", "/v1/files/{file_id}"): OBJECT,
    ("POST", "/v1/fine_tuning/jobs"): CREATE,
    ("POST", "/v1/fine_tuning/jobs/preflight"): CREATE,
    ("GET", "/v1/fine_tuning/jobs"): LIST,
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): OBJECT,
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"): OBJECT,
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause"): OBJECT,
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume"): OBJECT,
    ("DELETE", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): OBJECT,
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"): OBJECT,
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/samples"): OBJECT,
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"): OBJECT,
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}"): OBJECT,
    ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/content"): OBJECT,
    ("HEAD", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/content"): OBJECT,
    ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/content/url"): OBJECT,
    ("DELETE", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}"): OBJECT,
    ("GET", "/v1/pool"): OWN_VIEW,
    ("GET", "/v1/usage"): OWN_VIEW,
    ("GET", "/v1/admin/usage"): ADMIN,
    ("POST", "/v1/admin/sweep"): ADMIN,
    ("POST", "/v1/admin/teams"): ADMIN,
    ("GET", "/v1/admin/teams"): ADMIN,
    ("GET", "/v1/admin/teams/{team_id}"): ADMIN,
    ("PATCH", "/v1/admin/teams/{team_id}"): ADMIN,
    ("DELETE", "/v1/admin/teams/{team_id}"): ADMIN,
    ("POST", "/v1/admin/teams/{team_id}/keys"): ADMIN,
    ("GET", "/v1/admin/teams/{team_id}/keys"): ADMIN,
    ("DELETE", "/v1/admin/teams/{team_id}/keys/{key_id}"): ADMIN,
    ("POST", "/v1/webhooks"): CREATE,
    ("GET", "/v1/webhooks"): LIST,
    ("GET", "/v1/webhooks/{webhook_id}"): OBJECT,
    ("DELETE", "/v1/webhooks/{webhook_id}"): OBJECT,
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): OBJECT,
}
# A's webhook: the services the tests start let webhooks reach 127.0.0.1 (DPO_WEBHOOK_ALLOW_PRIVATE).
WEBHOOK = {"url": "http://127.0.0.1:9/hook", "events": ["fine_tuning.job.succeeded"]}


@dataclass
class TeamObjects:
    """Team A's objects the walk aims at (checkpoint: one of the job's; results: its metrics file;
    webhook: made with `a_webhook`)."""

    team_id: str
    key_id: str
    file_id: str
    job_id: str
    checkpoint_id: str
    results_file_id: str
    webhook_id: str


def a_webhook(call, a_key: str) -> str:
    """A webhook of A's (`call` as `walk` takes it); its id."""
    r = call("POST", "/v1/webhooks", a_key, json=WEBHOOK)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def v1_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every /v1 route the app serves; HEAD where a route of its own answers it (not the
    HEAD a plain Starlette route adds beside its GET)."""
    try:
        from fastapi.routing import iter_route_contexts  # FastAPI with lazily included routers
        routes = list(iter_route_contexts(app.routes))
    except ImportError:
        routes = app.routes
    return {(m, r.path) for r in routes if r.path.startswith("/v1/") for m in (r.methods or ())
            if m != "HEAD" or "GET" not in r.methods}


def walk(app, call, a: TeamObjects, a_key: str, b_key: str, b_team_id: str) -> dict[str, int]:
    """Call every route as B on A's objects; `call(method, url, key, **kw)` returns an httpx-like response.
    Returns how many routes of each kind were walked."""
    routes = v1_routes(app)
    unlisted = routes - set(ROUTES)
    assert not unlisted, f"routes missing from the isolation walk (add them to ROUTES): {sorted(unlisted)}"
    assert routes == set(ROUTES), f"ROUTES names routes the app does not have: {sorted(set(ROUTES) - routes)}"
    params = {"file_id": a.file_id, "fine_tuning_job_id": a.job_id, "checkpoint_id": a.checkpoint_id,
              "team_id": a.team_id, "key_id": a.key_id, "webhook_id": a.webhook_id}
    walked: dict[str, int] = {}
    for (method, path), kind in sorted(ROUTES.items()):
        # File routes are walked with the uploaded file and with the run's results file.
        for file_id in (a.file_id, a.results_file_id) if "{file_id}" in path else (a.file_id,):
            url = path.format(**{**params, "file_id": file_id})
            {OBJECT: _object, LIST: _list, CREATE: _create, OWN_VIEW: _own_view, ADMIN: _admin}[kind](
                call, method, url, a, b_key, b_team_id)
        walked[kind] = walked.get(kind, 0) + 1
    _still_there(call, a, a_key)
    return walked


def walk_without_a_valid_key(app, call, a: TeamObjects, a_key: str, revoked_key: str) -> int:
    """Call every route with an unknown key and with a revoked one, on A's objects: 401 each time,
    before anything else is checked or done. Returns how many routes were walked."""
    params = {"file_id": a.file_id, "fine_tuning_job_id": a.job_id, "checkpoint_id": a.checkpoint_id,
              "team_id": a.team_id, "key_id": a.key_id, "webhook_id": a.webhook_id}
    routes = v1_routes(app)
    for method, path in sorted(routes):
        url = path.format(**params)
        kw = {"json": {"name": "x"}} if method in ("POST", "PATCH") else {}
        for key in ("dpo-sk-unknown", revoked_key):
            r = call(method, url, key, **kw)
            assert r.status_code == 401, f"{method} {url} with key {key!r}: {r.status_code} {r.text[:300]}"
            assert method == "HEAD" or r.json()["error"]["code"] == "invalid_api_key", (method, url, r.text)
    _still_there(call, a, a_key)
    return len(routes)


def _object(call, method, url, a, b_key, b_team_id):
    r = call(method, url, b_key)
    assert r.status_code == 404, f"{method} {url} as another team: {r.status_code} {r.text[:300]}"
    # Exactly what an id that does not exist gets, apart from the id itself: nothing tells them apart.
    unknown = url
    for real, fake in _fakes(a):
        unknown = unknown.replace(real, fake)
    r2 = call(method, unknown, b_key)
    assert r2.status_code == 404
    if method == "HEAD":  # no body to compare: its GET twin is walked too
        return
    assert r.json()["error"]["code"] == "not_found"
    first_param = r.json()["error"]["param"]
    if first_param == r2.json()["error"]["param"]:
        assert _without_ids(r.json(), a) == _without_ids(r2.json(), a), (r.json(), r2.json())


def _list(call, method, url, a, b_key, b_team_id):
    r = call(method, url, b_key, params={"limit": 100})
    assert r.status_code == 200, r.text
    _no_a_ids(r.text, a, f"{method} {url}")
    for after, unknown in ((a.file_id, "file-0"), (a.job_id, "ftjob-0"), (a.webhook_id, "wh-0")):
        r = call(method, url, b_key, params={"after": after})
        r2 = call(method, url, b_key, params={"after": unknown})
        assert r.status_code in (400, 404), f"{method} {url}?after={after}: {r.status_code}"
        assert (r.status_code, _without_ids(r.json(), a)) == (r2.status_code, _without_ids(r2.json(), a))


def _create(call, method, url, a, b_key, b_team_id):
    row = b'{"prompt": "p", "chosen": " a", "rejected": " b"}\n'
    r = call("POST", "/v1/files", b_key, files={"file": ("b.jsonl", row)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["id"] != a.file_id
    if url == "/v1/files":
        return
    if url == "/v1/webhooks":
        r = call(method, url, b_key, json=WEBHOOK)
        assert r.status_code == 200 and r.json()["id"] != a.webhook_id, r.text
        return
    own_file = r.json()["id"]
    for field in ("training_file", "validation_file"):
        body = {"model": "m", "training_file": own_file, field: a.file_id}
        r = call(method, url, b_key, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        # Exactly what a file id that does not exist gets, apart from the id itself: nothing tells them apart.
        unknown = call(method, url, b_key, json={**body, field: "file-0"})
        assert _without_ids(r.json(), a) == _without_ids(unknown.json(), a), (r.json(), unknown.json())


def _own_view(call, method, url, a, b_key, b_team_id):
    r = call(method, url, b_key)
    assert r.status_code == 200, r.text
    _no_a_ids(r.text, a, url)
    body = r.json()
    if url == "/v1/usage":
        assert body["team_id"] == b_team_id
    if url == "/v1/pool":
        assert {t["team_id"] for t in body["by_team"]} <= {b_team_id}


def _admin(call, method, url, a, b_key, b_team_id):
    kw = {"json": {"name": "x"}} if method in ("POST", "PATCH") else {}
    r = call(method, url, b_key, **kw)
    assert r.status_code == 403, f"{method} {url} with a team key: {r.status_code} {r.text[:300]}"
    assert r.json()["error"]["code"] == "permission_denied"


def _still_there(call, a: TeamObjects, a_key: str):
    """B's cancel, pause and delete calls changed nothing of A's."""
    for url in (f"/v1/files/{a.file_id}", f"/v1/files/{a.results_file_id}/content",
                f"/v1/fine_tuning/jobs/{a.job_id}/checkpoints/{a.checkpoint_id}", f"/v1/webhooks/{a.webhook_id}"):
        assert call("GET", url, a_key).status_code == 200, url
    job = call("GET", f"/v1/fine_tuning/jobs/{a.job_id}", a_key).json()
    assert not job["cancel_requested"] and job["status"] not in ("cancelled", "paused") and not job["pause_requested"]


def _no_a_ids(text: str, a: TeamObjects, where: str):
    for value in (a.file_id, a.job_id, a.checkpoint_id, a.results_file_id, a.team_id, a.key_id, a.webhook_id):
        assert value not in text, f"{where} shows team A's {value}"


def _fakes(a: TeamObjects):
    return ((a.file_id, "file-0"), (a.results_file_id, "file-0"), (a.job_id, "ftjob-0"),
            (a.checkpoint_id, "ftckpt-0"), (a.webhook_id, "wh-0"))


def _without_ids(body: dict, a: TeamObjects) -> str:
    text = json.dumps(body)
    for real, fake in _fakes(a):
        text = text.replace(real, fake)
    return text
