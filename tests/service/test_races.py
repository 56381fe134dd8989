"""End-to-end: requests that race each other against a real API process, on SQLite and on PostgreSQL.
A file deleted while a job that uses it is being created: either the job exists and the delete got
409 file_in_use, or the delete won and the job was refused; never a job on a deleted file. Team names
that differ only in case, created at once: exactly one team, the others 409 naming `name`."""
from __future__ import annotations

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.processes import start_api
from tests.service.support import as_key, make_team

pytestmark = pytest.mark.slow
TRAINING = {"max_length": 64, "max_prompt_length": 32}
PAIRS = 60  # (create a job on file f, delete f) pairs, run 12 at a time


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request, tmp_path_factory):
    """An API process alone (no worker: the jobs stay queued), on its own data directory."""
    env = {"DPO_DATABASE_URL": request.getfixturevalue("postgres_url")} if request.param == "postgres" else {}
    service = start_api(tmp_path_factory.mktemp(f"races-{request.param}"), "races-" + secrets.token_hex(8), env)
    yield service
    service.stop()


def _upload(c: httpx.Client, key: str) -> str:
    r = c.post("/v1/files", headers=as_key(key), data={"purpose": "fine-tune"},
               files={"file": ("t.jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n')})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _create(c: httpx.Client, key: str, file_id: str) -> httpx.Response:
    return c.post("/v1/fine_tuning/jobs", headers=as_key(key),
                  json={"model": "owner/model", "training_file": file_id, "training": TRAINING})


def test_a_file_deleted_while_its_job_is_created_never_leaves_a_job_on_a_deleted_file(api):
    with api.client() as admin:
        key = make_team(admin, "racers")["key"]
        files = [_upload(admin, key) for _ in range(PAIRS)]
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "c"):
            local.c = api.client()
        return local.c

    # For each file, its job's creation and its deletion start together; a creation validates for a
    # while before it writes, which is where a delete slipped in.
    with ThreadPoolExecutor(12) as pool:
        futures = [(f, pool.submit(lambda f=f: _create(client(), key, f)),
                    pool.submit(lambda f=f: client().delete(f"/v1/files/{f}", headers=as_key(key)))) for f in files]
        pairs = [(f, c.result(), d.result()) for f, c, d in futures]

    with api.client() as c:
        jobs = c.get("/v1/fine_tuning/jobs", headers=as_key(key), params={"limit": 100}).json()["data"]
        for file_id, created, deleted in pairs:
            assert created.status_code in (200, 400) and deleted.status_code in (200, 409), (created.text, deleted.text)
            exists = c.get(f"/v1/files/{file_id}", headers=as_key(key)).status_code == 200
            if created.status_code == 200:  # the job exists: its file must, and the delete was refused
                assert exists and deleted.status_code == 409, (file_id, deleted.text)
                assert deleted.json()["error"]["code"] == "file_in_use"
                assert deleted.json()["error"]["param"] == "file_id"
            else:  # the delete won: the creation names the file it could not use, and made nothing
                assert not exists and deleted.status_code == 200, (file_id, created.text)
                error = created.json()["error"]
                assert (error["param"], error["code"]) == ("training_file", "invalid_file")
        on_deleted_files = [j["id"] for j in jobs if c.get(f"/v1/files/{j['training_file']}",
                                                            headers=as_key(key)).status_code != 200]
    assert on_deleted_files == []
    assert len(jobs) == sum(created.status_code == 200 for _, created, _ in pairs)


def test_team_names_are_unique_whatever_their_case_even_at_once(api):
    spellings = ["Research", "research", "RESEARCH", "reSearch", "ReSeArCh", "researcH"]
    with api.client() as admin:
        for round_ in range(3):
            names = [f"{s}-{round_}" for s in spellings]
            barrier = threading.Barrier(len(names))

            def create(name: str) -> httpx.Response:
                with api.client() as c:
                    barrier.wait()
                    return c.post("/v1/admin/teams", json={"name": name})

            with ThreadPoolExecutor(len(names)) as pool:
                answers = list(pool.map(create, names))
            made = [r for r in answers if r.status_code == 200]
            assert len(made) == 1, [r.text for r in answers]
            for r in answers:
                if r.status_code != 200:
                    assert r.status_code == 409 and r.json()["error"]["param"] == "name", r.text
                    assert r.json()["error"]["code"] == "name_taken"
        teams = [t["name"].lower() for t in admin.get("/v1/admin/teams", params={"limit": 100}).json()["data"]]
        assert sorted(teams) == sorted(set(teams))
