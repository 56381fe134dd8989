"""Integration: event ids are opaque cursors, on SQLite and on PostgreSQL. Events are ordered by one
sequence across every team's jobs; a team's event ids must not show how many events other teams wrote
in between, paging by them (either way) must return each event once, and any string that is not an
event of this job is a 400 on `after`, never a 500."""
from __future__ import annotations

import re
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.main import create_app
from service.db.jobs import add_event
from service.db.models import Event
from tests.service.support import API_KEY, as_key, fresh_postgres, make_settings, make_team, sessions_for

GOOD = b'{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}\n'
OTHERS_EVENTS = 300


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("event-ids") / "data"
    if request.param == "sqlite":
        yield make_settings(data_dir)
        return
    with fresh_postgres() as url:
        yield make_settings(data_dir, database_url=url)


@pytest.fixture(scope="module")
def api(settings):
    with TestClient(create_app(settings), headers=as_key(API_KEY)) as c:
        yield c


def new_job(api, key: str) -> str:
    file_id = api.post("/v1/files", files={"file": ("t.jsonl", GOOD * 4)}, data={"purpose": "fine-tune"},
                       headers=as_key(key)).json()["id"]
    r = api.post("/v1/fine_tuning/jobs", headers=as_key(key), json={
        "model": "owner/tiny-model", "training_file": file_id, "training": {"max_length": 64, "max_prompt_length": 32}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def write_events(settings, job_id: str, n: int) -> None:
    """`n` events of `job_id`, written as a worker writes them (service.db.jobs.add_event)."""
    with sessions_for(settings).begin() as s:
        for i in range(n):
            add_event(s, job_id, f"Step {i}", type="metrics", data={"step": i})


def events(api, job_id: str, key: str, order: str = "desc", limit: int = 100, after: str | None = None) -> list[dict]:
    params = {"order": order, "limit": limit, **({"after": after} if after else {})}
    r = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params, headers=as_key(key))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def teams(api, settings):
    """Team A's job, with a gap of OTHERS_EVENTS of team B's events between two of its events; and B's job."""
    a, b = make_team(api, "events-a"), make_team(api, "events-b")
    job_a, job_b = new_job(api, a["key"]), new_job(api, b["key"])
    write_events(settings, job_a, 1)
    write_events(settings, job_b, OTHERS_EVENTS)
    write_events(settings, job_a, 1)
    return {"a": a, "b": b, "job_a": job_a, "job_b": job_b}


def seqs(settings, ids: list[str]) -> list[int]:
    with sessions_for(settings)() as s:
        by_id = dict(s.execute(select(Event.id, Event.seq).where(Event.id.in_(ids))).all())
    return [by_id[i] for i in ids]


def test_an_event_id_is_its_creation_time_and_random_digits_only(api, settings, teams):
    """The seq gap is in the database; what the team reads of two events is their ids (milliseconds of
    their creation, then 48 random bits) and nothing that depends on how many events lie between."""
    started = int(time.time() * 1000)
    write_events(settings, teams["job_b"], OTHERS_EVENTS)
    write_events(settings, teams["job_a"], 1)
    ended = int(time.time() * 1000)
    listed = events(api, teams["job_a"], teams["a"]["key"])["data"]
    newest, before = listed[0]["id"], listed[1]["id"]
    gap = seqs(settings, [newest])[0] - seqs(settings, [before])[0]
    assert gap > OTHERS_EVENTS  # the other team's events are between them
    for event_id in (newest, before):
        assert re.fullmatch(r"ftevent-[0-9a-f]{24}", event_id), event_id
    assert started <= int(newest[len("ftevent-"):][:12], 16) <= ended


def test_paging_either_way_returns_every_event_once(api, settings, teams):
    job, key = teams["job_a"], teams["a"]["key"]
    write_events(settings, job, 3)
    write_events(settings, teams["job_b"], 7)
    write_events(settings, job, 20)
    everything = [e["id"] for e in events(api, job, key, order="asc")["data"]]
    assert len(everything) == len(set(everything)) >= 25
    assert seqs(settings, everything) == sorted(seqs(settings, everything))  # created order
    for order in ("asc", "desc"):
        seen, after = [], None
        while True:
            page = events(api, job, key, order=order, limit=4, after=after)
            seen += [e["id"] for e in page["data"]]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == (everything if order == "asc" else everything[::-1])


def test_ids_are_the_same_from_another_api_process(api, settings, teams):
    """Another app on the same database (another process, or this one restarted) lists the same ids."""
    first = events(api, teams["job_a"], teams["a"]["key"])["data"]
    with TestClient(create_app(settings, migrate=False), headers=as_key(API_KEY)) as other:
        again = events(other, teams["job_a"], teams["a"]["key"])["data"]
        cursor = first[1]["id"]
        assert events(other, teams["job_a"], teams["a"]["key"], after=cursor)["data"] == first[2:]
    assert again == first


BAD_CURSORS = ["ftevent-9223372036854775808", "ftevent-" + "9" * 30, "ftevent-" + "9" * 5000, "9223372036854775808",
               "-1", "0", "ftevent-1", "ftevent--1", "../x", "a\x00b", "ftevent-\x00", "ftevent-٣", "ftevent-²",
               "ftevent-1e309", "ftevent-" + "f" * 24, "é中", "ftevent-" + "a" * 65, " ", "ftjob-x"]


@pytest.mark.parametrize("key", ["team", "admin"])
def test_a_cursor_that_is_not_an_event_of_this_job_is_400_on_after(api, teams, key):
    presented = teams["a"]["key"] if key == "team" else API_KEY
    other_jobs = events(api, teams["job_b"], teams["b"]["key"], limit=1)["data"][0]["id"]
    own_other_job = new_job(api, teams["a"]["key"])
    for cursor in [*BAD_CURSORS, other_jobs, events(api, own_other_job, presented, limit=1)["data"][0]["id"]]:
        r = api.get(f"/v1/fine_tuning/jobs/{teams['job_a']}/events", params={"after": cursor},
                    headers=as_key(presented))
        assert r.status_code == 400, (cursor[:40], r.text[:300])
        assert r.json()["error"]["param"] == "after"
