"""Integration: teams and keys through the admin API, and each team seeing only its own objects
(the isolation walk over every /v1 route), on SQLite in-process."""
from __future__ import annotations

from sqlalchemy import select

from service.db import jobs
from service.db.models import ApiKey, File
from tests.service.isolation import (
    ADMIN,
    CREATE,
    LIST,
    OBJECT,
    OWN_VIEW,
    TeamObjects,
    a_webhook,
    walk,
    walk_without_a_valid_key,
)
from tests.service.support import as_key, make_team, sessions_for, upload

TRAINING = {"max_length": 64, "max_prompt_length": 32}


def test_admin_manages_teams(client):
    r = client.post("/v1/admin/teams", json={"name": "vision", "max_running_jobs": 2, "max_queued_jobs": 10})
    assert r.status_code == 200, r.text
    team = r.json()
    assert team["id"].startswith("team-") and team["object"] == "team"
    assert (team["name"], team["max_running_jobs"], team["max_queued_jobs"]) == ("vision", 2, 10)
    assert client.get(f"/v1/admin/teams/{team['id']}").json() == team
    names = [t["name"] for t in client.get("/v1/admin/teams").json()["data"]]
    assert names == ["vision", "default"]

    r = client.patch(f"/v1/admin/teams/{team['id']}", json={"max_queued_jobs": None, "name": "vision-2"})
    assert (r.json()["name"], r.json()["max_running_jobs"], r.json()["max_queued_jobs"]) == ("vision-2", 2, None)
    assert client.post("/v1/admin/teams", json={"name": "vision-2"}).status_code == 409
    assert client.patch(f"/v1/admin/teams/{team['id']}", json={"name": None}).status_code == 400
    for bad in ({"name": ""}, {"name": "a/b"}, {"name": "x", "max_running_jobs": -1}, {"name": "x", "extra": 1}):
        r = client.post("/v1/admin/teams", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"], (bad, r.text)

    assert client.delete(f"/v1/admin/teams/{team['id']}").json() == {
        "id": team["id"], "object": "team", "deleted": True}
    assert client.get(f"/v1/admin/teams/{team['id']}").status_code == 404
    assert client.post("/v1/admin/teams", json={"name": "vision-2"}).status_code == 200  # the name is free again
    r = client.delete("/v1/admin/teams/team-default")
    assert r.status_code == 409


def test_team_names_are_unique_whatever_their_case(client):
    research = client.post("/v1/admin/teams", json={"name": "Research"}).json()
    for name in ("research", "RESEARCH", "Default"):
        r = client.post("/v1/admin/teams", json={"name": name})
        assert r.status_code == 409, r.text
        assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("name", "name_taken")
    vision = client.post("/v1/admin/teams", json={"name": "vision"}).json()
    r = client.patch(f"/v1/admin/teams/{vision['id']}", json={"name": "reSEARCH"})
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"
    r = client.patch(f"/v1/admin/teams/{research['id']}", json={"name": "RESEARCH"})  # its own name, recased
    assert r.status_code == 200 and r.json()["name"] == "RESEARCH"
    client.delete(f"/v1/admin/teams/{research['id']}")
    assert client.post("/v1/admin/teams", json={"name": "research"}).status_code == 200  # free once deleted


def test_keys_are_shown_once_stored_hashed_and_revoked_at_once(client, settings):
    team = make_team(client, "nlp")
    key = team["key"]
    assert key.startswith("dpo-sk-") and len(key) > 40
    assert client.get("/v1/files", headers=as_key(key)).status_code == 200
    listed = client.get(f"/v1/admin/teams/{team['id']}/keys").json()["data"]
    assert [(k["id"], k["name"], k["revoked_at"]) for k in listed] == [(team["key_id"], "nlp-ci", None)]
    assert "key" not in listed[0] and listed[0]["hint"] == key[:11] + "..."
    with sessions_for(settings)() as s:
        stored = s.scalars(select(ApiKey)).one()
    assert key not in (stored.key_hash, stored.hint) and len(stored.key_hash) == 64

    r = client.delete(f"/v1/admin/teams/{team['id']}/keys/{team['key_id']}")
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = client.get("/v1/files", headers=as_key(key))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.delete(f"/v1/admin/teams/team-default/keys/{team['key_id']}").status_code == 404


def test_a_team_with_unfinished_jobs_cannot_be_deleted_and_a_deleted_teams_keys_stop(client, task_files):
    team = make_team(client, "rl")
    train = upload(client, task_files[0], headers=as_key(team["key"]))
    job = client.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]),
                      json={"model": "m", "training_file": train["id"], "training": TRAINING}).json()
    r = client.delete(f"/v1/admin/teams/{team['id']}")
    assert r.status_code == 409 and (r.json()["error"]["code"], r.json()["error"]["param"]) == ("conflict", "team_id")
    assert team["id"] in r.json()["error"]["message"]
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=as_key(team["key"]))
    assert client.delete(f"/v1/admin/teams/{team['id']}").status_code == 200
    assert client.get("/v1/files", headers=as_key(team["key"])).status_code == 401
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["team"] == team["id"]  # the admin still sees it


def test_lists_show_a_team_its_own_and_the_admin_everything(client, task_files):
    a, b = make_team(client, "a"), make_team(client, "b")
    fa = upload(client, task_files[1], headers=as_key(a["key"]))
    fb = upload(client, task_files[1], headers=as_key(b["key"]))
    ja = client.post("/v1/fine_tuning/jobs", headers=as_key(a["key"]),
                     json={"model": "m", "training_file": fa["id"], "training": TRAINING}).json()
    assert ja["team"] == ja["organization_id"] == a["id"]
    ids = lambda r: [x["id"] for x in r.json()["data"]]  # noqa: E731
    assert ids(client.get("/v1/files", headers=as_key(a["key"]))) == [fa["id"]]
    assert ids(client.get("/v1/files", headers=as_key(b["key"]))) == [fb["id"]]
    assert set(ids(client.get("/v1/files"))) == {fa["id"], fb["id"]}
    assert ids(client.get("/v1/fine_tuning/jobs", headers=as_key(b["key"]))) == []
    assert ids(client.get("/v1/fine_tuning/jobs")) == [ja["id"]]
    # The admin's own jobs belong to the default team and use its files, not a team's.
    r = client.post("/v1/fine_tuning/jobs", json={"model": "m", "training_file": fa["id"], "training": TRAINING})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file" and a["id"] in r.text


def test_every_v1_route_isolates_teams(client, settings, task_files):
    a, b = make_team(client, "a"), make_team(client, "b")
    objects = _team_a_objects(client, settings, a, task_files)

    def call(method, url, key, **kw):
        return client.request(method, url, headers=as_key(key), **kw)

    walked = walk(client.app, call, objects, a["key"], b["key"], b["id"])
    assert walked == {OBJECT: 21, LIST: 3, CREATE: 4, OWN_VIEW: 2, ADMIN: 10}
    # The admin key sees A's objects on the same routes.
    assert client.get(f"/v1/fine_tuning/jobs/{objects.job_id}/checkpoints/{objects.checkpoint_id}").status_code == 200


def test_every_v1_route_refuses_an_unknown_or_revoked_key(client, settings, task_files):
    """Routes check a team key themselves (api.deps: CurrentPrincipal, or `read`), not the /v1 router:
    this walk is what catches a route that forgets to."""
    a, gone = make_team(client, "a"), make_team(client, "gone")
    objects = _team_a_objects(client, settings, a, task_files)
    assert client.delete(f"/v1/admin/teams/{gone['id']}/keys/{gone['key_id']}").status_code == 200

    def call(method, url, key, **kw):
        return client.request(method, url, headers=as_key(key), **kw)

    assert walk_without_a_valid_key(client.app, call, objects, a["key"], gone["key"]) == 40


def _team_a_objects(client, settings, a: dict, task_files) -> TeamObjects:
    """A's file and job, with a checkpoint and a results file as a finished run leaves them (written
    here through the store, as the worker would; the end-to-end walk trains for real)."""
    key = as_key(a["key"])
    train = upload(client, task_files[1], headers=key)
    job = client.post("/v1/fine_tuning/jobs", headers=key,
                      json={"model": "m", "training_file": train["id"], "training": TRAINING}).json()
    ckpt_dir = settings.data_dir / "jobs" / job["id"] / "checkpoint-1"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "config.json").write_text("{}")
    (settings.data_dir / "jobs" / job["id"] / "metrics.jsonl").write_text('{"step": 1}\n')
    with sessions_for(settings).begin() as s:
        ckpt = jobs.add_checkpoint(s, job["id"], 1, f"jobs/{job['id']}/checkpoint-1", {"loss": 0.5})
        results = File(team_id=a["id"], filename="m.jsonl", purpose="fine-tune-results", bytes=12, format="metrics",
                       rows=1, storage_key=f"jobs/{job['id']}/metrics.jsonl", created_at=0)
        s.add(results)
        s.flush()
        ids = ckpt.id, results.id
    webhook_id = a_webhook(lambda method, url, key, **kw: client.request(method, url, headers=as_key(key), **kw),
                           a["key"])
    return TeamObjects(team_id=a["id"], key_id=a["key_id"], file_id=train["id"], job_id=job["id"],
                       checkpoint_id=ids[0], results_file_id=ids[1], webhook_id=webhook_id)
