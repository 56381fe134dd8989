"""Integration: the orphan sweep removes stored objects no row names once they are old enough (an upload
without its File row, a job prefix without its Job row, an ended job's objects no Checkpoint or File row
names, an unfinished publish), and never an object a row names, anything of a job that has not ended, a
young object, or anything outside files/ and jobs/. A dry run lists the same and removes nothing. Through
service.sweep, POST /v1/admin/sweep, `dpo-service admin sweep` and the API's own loop; on SQLite and
PostgreSQL with the local store, and on a real S3 server."""
from __future__ import annotations

import json
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest

from service import admin_cli, cli
from service.artifacts import make_storage, state_key
from service.db import jobs
from service.db.migrate import upgrade
from service.sweep import Sweeper, sweep
from tests.service.support import API_KEY, make_settings, sessions_for, upload
from tests.service.test_symlinks import create

HOUR = 3600


@pytest.fixture(params=["sqlite", "postgres", "s3"])
def settings(request, tmp_path):
    extra = {}
    if request.param == "postgres":
        extra["database_url"] = request.getfixturevalue("postgres_url")
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        extra |= {"storage_url": f"s3://{server.bucket}/{uuid.uuid4().hex}", "s3_endpoint_url": server.endpoint}
    s = make_settings(tmp_path / "data", sweep_min_age_s=HOUR, **extra)
    upgrade(s.db_url)
    return s


def keys(storage, prefix: str = "") -> set[str]:
    return {o.key for o in storage.list(prefix)}


def put(storage, key: str, data: bytes = b"x" * 10) -> list[str]:
    storage.put_stream(key, [data])
    return [key]


def publish(storage, tmp_path, key: str) -> list[str]:
    """The objects a published directory is stored as (its files, or its tar and manifest)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_bytes(b"{}")
    (src / "w.bin").write_bytes(b"w" * 100)
    before = keys(storage)
    storage.publish_dir(src, key, "arc")
    return sorted(keys(storage) - before)


@pytest.fixture
def store(client, settings, task_files, tmp_path) -> dict:
    """A store with what the sweep must keep and what it must remove (`orphans`, their bytes). Everything
    but `young` was stored before `cut`; a sweep at cut + its minimum age sees them old enough."""
    storage = make_storage(settings)
    train_id = upload(client, task_files[0])["id"]
    ended = create(client, "owner/model", train_id).json()["id"]
    live = create(client, "owner/model", train_id).json()["id"]
    kept_ckpt = f"jobs/{ended}/checkpoint-2"
    kept = [f"files/{train_id}.jsonl", *publish(storage, tmp_path, kept_ckpt)]
    with sessions_for(settings).begin() as s:
        jobs.add_checkpoint(s, ended, 2, kept_ckpt, None)
    client.post(f"/v1/fine_tuning/jobs/{ended}/cancel")
    orphans = [
        *put(storage, "files/file-0123abc.jsonl"),  # an upload without its row
        *put(storage, "jobs/ftjob-0gone/metrics.jsonl"),  # a job without its row
        *publish(storage, tmp_path, f"jobs/{ended}/checkpoint-1"),  # no Checkpoint row names it
        *put(storage, state_key(ended, "tracking.json")),  # no row names it: only a resumed run reads it
        *put(storage, f"jobs/{ended}/checkpoint-3.tar"),  # a publish that never finished
    ]
    kept += [
        *put(storage, f"jobs/{live}/checkpoint-1/w.bin"),  # a job that has not ended: never touched
        *put(storage, f"jobs/{live}/checkpoint-4.tar"),
        *put(storage, "elsewhere/x.bin"),  # outside files/ and jobs/
    ]
    cut = time.time()
    time.sleep(1.5)  # S3 keeps whole seconds
    young = put(storage, "files/file-0young.jsonl")
    sizes = {o.key: o.size for o in storage.list("")}
    return {"orphans": sorted(orphans), "kept": kept, "young": young, "cut": cut, "ended": ended,
            "bytes": sum(sizes[k] for k in orphans)}


def test_the_sweep_removes_orphans_and_nothing_a_row_names(settings, store):
    sessions, storage = sessions_for(settings), make_storage(settings)
    before = keys(storage)
    at = store["cut"] + HOUR
    dry = sweep(sessions, storage, HOUR, dry_run=True, at=at)
    assert (dry.dry_run, sorted(o.key for o in dry.removed), dry.bytes) == (True, store["orphans"], store["bytes"])
    assert keys(storage) == before

    report = sweep(sessions, storage, HOUR, at=at)
    assert sorted(o.key for o in report.removed) == store["orphans"] and report.bytes == store["bytes"]
    assert not report.failed
    assert keys(storage) == before - set(store["orphans"])
    assert set(store["kept"] + store["young"]) <= keys(storage)
    # A directory no row names goes whole, as does a prefix without its job: no empty directory is left.
    ended = store["ended"]
    assert storage.list_dirs(f"jobs/{ended}") == [f"jobs/{ended}/checkpoint-2"]
    assert not storage.exists("jobs/ftjob-0gone")
    assert sweep(sessions, storage, HOUR, at=at).removed == []  # nothing left to remove


@pytest.mark.parametrize("settings", ["sqlite", "s3"], indirect=True)  # the database's part is tested above
def test_admin_sweep_route_and_command(client, settings, store, monkeypatch, capsys):
    settings.sweep_min_age_s = time.time() - store["cut"]  # what the fixture stored before `cut` is old enough
    assert client.post("/v1/admin/sweep", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.post("/v1/admin/sweep", params={"dry_run": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["object"], body["dry_run"], body["bytes"], body["failed"]) == ("storage.sweep", True, store["bytes"], [])
    assert sorted(o["key"] for o in body["removed"]) == store["orphans"]
    assert all(o["modified_at"] <= store["cut"] for o in body["removed"])

    # `dpo-service admin sweep` sends the same request to the API it is pointed at (here, this app).
    class ThisApp:
        def __init__(self, base_url, headers, timeout):
            self.headers = headers

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def request(self, method, path, **kw):
            return client.request(method, path, headers=self.headers, **kw)

    monkeypatch.setattr(admin_cli, "httpx", SimpleNamespace(Client=ThisApp, HTTPError=httpx.HTTPError))
    monkeypatch.setenv("DPO_DATA_DIR", str(settings.data_dir))
    argv = ["admin", "--url", "http://testserver", "--key", API_KEY, "sweep"]
    storage = make_storage(settings)
    assert cli.main([*argv, "--dry-run"]) == 0
    assert sorted(o["key"] for o in json.loads(capsys.readouterr().out)["removed"]) == store["orphans"]
    assert set(store["orphans"]) <= keys(storage)
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["dry_run"] is False
    assert not set(store["orphans"]) & keys(storage) and set(store["kept"]) <= keys(storage)


@pytest.mark.parametrize("settings", ["sqlite", "s3"], indirect=True)
def test_each_api_process_sweeps_on_its_own(settings, store):
    storage = make_storage(settings)
    sweeper = Sweeper(sessions_for(settings), storage, settings.model_copy(update={
        "sweep_interval_s": 0.05, "sweep_min_age_s": time.time() - store["cut"]}))
    sweeper.start()
    try:
        deadline = time.time() + 30
        while set(store["orphans"]) & keys(storage) and time.time() < deadline:
            time.sleep(0.1)
    finally:
        sweeper.stop()
    assert not set(store["orphans"]) & keys(storage)
    assert set(store["kept"]) <= keys(storage)
