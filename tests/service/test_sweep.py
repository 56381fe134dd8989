"""Integration: the orphan sweep removes stored objects no row names once they are old enough (an upload
without its File row, a job prefix without its Job row, an ended job's objects no Checkpoint or File row
names, an unfinished publish), and never an object a row names, anything of a job that has not ended, a
young object, or anything outside files/ and jobs/. A dry run lists the same and removes nothing. Through
service.sweep, POST /v1/admin/sweep, `dpo-service admin sweep` and the API's own loop; on SQLite and
PostgreSQL."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import httpx
import pytest

from service import admin_cli, cli
from service.artifacts import make_storage
from service.db import jobs
from service.db.migrate import upgrade
from service.sweep import Sweeper, sweep
from tests.service.support import API_KEY, make_settings, sessions_for, upload
from tests.service.test_symlinks import create

HOUR = 3600
OLD = time.time() - 2 * HOUR


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    s = make_settings(tmp_path / "data", sweep_min_age_s=HOUR, **({"database_url": url} if url else {}))
    upgrade(s.db_url)
    return s


def aged(settings, *keys: str) -> None:
    """Make the stored objects under these keys two hours old."""
    for key in keys:
        path = settings.data_dir / key
        for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
            os.utime(p, (OLD, OLD), follow_symlinks=False)


def put(settings, key: str, data: bytes = b"x" * 10, old: bool = True) -> str:
    make_storage(settings).put_stream(key, [data])
    if old:
        aged(settings, key)
    return key


def publish(settings, tmp_path, key: str, old: bool = True) -> str:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "config.json").write_bytes(b"{}")
    (src / "w.bin").write_bytes(b"w" * 100)
    make_storage(settings).publish_dir(src, key, "arc")
    if old:
        aged(settings, key)
    return key


@pytest.fixture
def store(client, settings, task_files, tmp_path) -> dict:
    """A store with what the sweep must keep and what it must remove (`orphans`, their bytes)."""
    train_id = upload(client, task_files[0])["id"]
    aged(settings, f"files/{train_id}.jsonl")
    ended = create(client, "owner/model", train_id).json()["id"]
    live = create(client, "owner/model", train_id).json()["id"]
    kept_ckpt = publish(settings, tmp_path, f"jobs/{ended}/checkpoint-2")
    with sessions_for(settings).begin() as s:
        jobs.add_checkpoint(s, ended, 2, kept_ckpt, None)
    client.post(f"/v1/fine_tuning/jobs/{ended}/cancel")
    orphans = [
        put(settings, "files/file-0123abc.jsonl"),  # an upload without its row
        put(settings, "jobs/ftjob-0gone/metrics.jsonl"),  # a job without its row
        *[f"jobs/{ended}/checkpoint-1/{n}" for n in ("config.json", "w.bin")],  # no Checkpoint row
        put(settings, f"jobs/{ended}/tracking.json"),  # no row names it
        put(settings, f"jobs/{ended}/.checkpoint-3.tmp-1-2/w.bin"),  # an unfinished publish
    ]
    publish(settings, tmp_path, f"jobs/{ended}/checkpoint-1")
    kept = [
        f"files/{train_id}.jsonl", f"{kept_ckpt}/config.json", f"{kept_ckpt}/w.bin",
        put(settings, f"jobs/{live}/checkpoint-1/w.bin"),  # a job that has not ended: never touched
        put(settings, f"jobs/{live}/.final.tmp-1-2/w.bin"),
        put(settings, "files/file-0young.jsonl", old=False),  # too young
        put(settings, "elsewhere/x.bin"),  # outside files/ and jobs/
    ]
    sizes = {o.key: o.size for o in make_storage(settings).list("")}
    return {"orphans": sorted(orphans), "kept": kept, "bytes": sum(sizes[k] for k in orphans), "ended": ended}


def stored(settings) -> set[str]:
    return {o.key for o in make_storage(settings).list("")}


def test_the_sweep_removes_orphans_and_nothing_a_row_names(settings, store):
    sessions, storage = sessions_for(settings), make_storage(settings)
    before = stored(settings)
    dry = sweep(sessions, storage, HOUR, dry_run=True)
    assert (dry.dry_run, sorted(o.key for o in dry.removed), dry.bytes) == (True, store["orphans"], store["bytes"])
    assert stored(settings) == before

    report = sweep(sessions, storage, HOUR)
    assert sorted(o.key for o in report.removed) == store["orphans"] and report.bytes == store["bytes"]
    assert not report.failed
    assert stored(settings) == before - set(store["orphans"])
    assert set(store["kept"]) <= stored(settings)
    # A directory no row names goes whole, as does a prefix without its job: no empty directory is left.
    assert not storage.dir_exists(f"jobs/{store['ended']}/checkpoint-1") and not storage.dir_exists("jobs/ftjob-0gone")
    assert storage.list_dirs(f"jobs/{store['ended']}") == [f"jobs/{store['ended']}/checkpoint-2"]
    assert sweep(sessions, storage, HOUR).removed == []  # nothing left to remove


def test_admin_sweep_route_and_command(client, settings, store, monkeypatch, capsys):
    assert client.post("/v1/admin/sweep", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.post("/v1/admin/sweep", params={"dry_run": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["object"], body["dry_run"], body["bytes"]) == ("storage.sweep", True, store["bytes"])
    assert sorted(o["key"] for o in body["removed"]) == store["orphans"]
    assert all(o["modified_at"] <= OLD + 1 for o in body["removed"])

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
    assert cli.main([*argv, "--dry-run"]) == 0
    assert sorted(o["key"] for o in json.loads(capsys.readouterr().out)["removed"]) == store["orphans"]
    assert set(store["orphans"]) <= stored(settings)
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["dry_run"] is False
    assert not set(store["orphans"]) & stored(settings) and set(store["kept"]) <= stored(settings)


def test_each_api_process_sweeps_on_its_own(settings, store):
    sweeper = Sweeper(sessions_for(settings), make_storage(settings),
                      settings.model_copy(update={"sweep_interval_s": 0.05}))
    sweeper.start()
    try:
        deadline = time.time() + 20
        while set(store["orphans"]) & stored(settings) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        sweeper.stop()
    assert not set(store["orphans"]) & stored(settings)
    assert set(store["kept"]) <= stored(settings)
