"""Integration: what a job keeps (the service's checkpoint retention, save_total_limit overriding it) and
how much a team may store (its storage quota, shown in /v1/usage), through the real app and the worker's
JobRunner in this process; the quota on SQLite and on PostgreSQL."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from service.db import jobs
from tests.service.support import (
    API_KEY,
    as_key,
    fresh_postgres,
    make_settings,
    make_team,
    run_on_worker,
    sessions_for,
    upload,
)

FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32}


def _swapped(src: Path, out: Path) -> Path:
    """The validation pairs with chosen and rejected swapped: the better the policy learns the training
    rule, the higher its eval_loss here, so the best checkpoint by eval is an early one."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()][:8]
    out.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    return out


def _job(client, model, train_id, val_id, **training) -> str:
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": model, "training_file": train_id, "validation_file": val_id, "training": {**FAST, **training},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _eval_losses(client, job_id) -> dict[int, float]:
    log = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
    return {e["data"]["step"]: e["data"]["eval_loss"] for e in log if e["type"] == "metrics" and "eval_loss" in e["data"]}


@pytest.mark.parametrize("limit, latest", [(None, [4, 6, 8]), (1, [8])], ids=["service-default", "job-limit"])
def test_a_job_keeps_its_latest_checkpoints_and_its_best_by_eval(client, settings, task_files, tiny_model, tmp_path,
                                                                   limit, latest):
    train_id = upload(client, task_files[0])["id"]
    val_id = upload(client, _swapped(task_files[1], tmp_path / "val.jsonl"))["id"]
    extra = {} if limit is None else {"save_total_limit": limit}
    job_id = _job(client, tiny_model, train_id, val_id, max_steps=8, save_steps=2, eval_steps=2, logging_steps=2,
                  **extra)
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["training"]["save_total_limit"] == (limit or 3)
    assert run_on_worker(settings, job_id) == "succeeded"

    evals = _eval_losses(client, job_id)
    best = min((loss, -step) for step, loss in evals.items() if step < 8)  # evaluated at a checkpoint's step
    best_step = -best[1]
    assert best_step < latest[0], "the best checkpoint must be one the latest-N rule alone would delete"
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"]
    assert sorted(c["step_number"] for c in ckpts if not c["final"]) == [best_step, *latest]
    assert [c["step_number"] for c in ckpts if c["final"]] == [8]
    out = settings.data_dir / "jobs" / job_id
    on_disk = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert on_disk == [best_step, *latest] and (out / "final" / "config.json").is_file()
    for c in ckpts:
        assert client.get(c["download_url"]).status_code == 200


def test_a_teams_storage_counts_checkpoints_and_deleting_one_frees_it(client, settings, task_files, tiny_model):
    train_id = upload(client, task_files[0])["id"]
    job_id = _job(client, tiny_model, train_id, None, max_steps=4, save_steps=2)
    def usage() -> int:
        return client.get("/v1/usage").json()["storage_bytes"]

    before = usage()
    assert before == task_files[0].stat().st_size
    assert run_on_worker(settings, job_id) == "succeeded"
    out = settings.data_dir / "jobs" / job_id
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())  # checkpoints, final, metrics.jsonl
    assert usage() == before + on_disk
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    first = next(c for c in ckpts if c["step_number"] == 2)
    size = sum(p.stat().st_size for p in (out / "checkpoint-2").rglob("*") if p.is_file())
    r = client.delete(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{first['id']}")
    assert r.status_code == 200 and r.json() == {"id": first["id"], "object": "fine_tuning.job.checkpoint",
                                                 "deleted": True}
    assert not (out / "checkpoint-2").exists() and usage() == before + on_disk - size
    assert client.get(first["download_url"]).status_code == 404


def test_a_checkpoint_of_an_unfinished_job_cannot_be_deleted(client, settings, task_files, tiny_model):
    job_id = _job(client, tiny_model, upload(client, task_files[0])["id"], None, max_steps=4)
    with sessions_for(settings).begin() as s:  # as a lost run leaves it: queued again, resuming from it
        ckpt = jobs.add_checkpoint(s, job_id, 2, f"jobs/{job_id}/checkpoint-2", None)
        s.flush()
        ckpt_id = ckpt.id
    r = client.delete(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpt_id}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def quota_api(request, tmp_path):
    """The app with a service-wide default of 10 MB per team."""
    def app(settings):
        return TestClient(create_app(settings), headers=as_key(API_KEY))

    if request.param == "sqlite":
        with app(make_settings(tmp_path / "data", team_storage_bytes=10_000_000)) as c:
            yield c
        return
    with fresh_postgres() as url, app(make_settings(tmp_path / "data", database_url=url,
                                                    team_storage_bytes=10_000_000)) as c:
        yield c


def test_the_storage_quota_refuses_uploads_past_it_and_jobs_at_it(quota_api, task_files):
    api, data = quota_api, task_files[1]
    size = data.stat().st_size
    team = make_team(api, "capped", max_storage_bytes=2 * size + size // 2)
    assert team["max_storage_bytes"] == 2 * size + size // 2
    key = as_key(team["key"])
    first, _ = upload(api, data, headers=key), upload(api, data, headers=key)
    r = api.post("/v1/files", files={"file": (data.name, data.read_bytes())}, data={"purpose": "fine-tune"}, headers=key)
    assert r.status_code == 429, r.text
    assert (r.json()["error"]["type"], r.json()["error"]["code"], r.json()["error"]["param"]) == (
        "insufficient_quota", "storage_quota_exceeded", "file")
    assert len(api.get("/v1/files", headers=key).json()["data"]) == 2  # nothing of the refused upload stayed
    usage = api.get("/v1/usage", headers=key).json()
    assert (usage["storage_bytes"], usage["storage_limit_bytes"]) == (2 * size, 2 * size + size // 2)

    job = {"model": "m", "training_file": first["id"], "training": {"max_length": 64, "max_prompt_length": 32}}
    assert api.post("/v1/fine_tuning/jobs", json=job, headers=key).status_code == 200  # under the limit
    assert api.patch(f"/v1/admin/teams/{team['id']}", json={"max_storage_bytes": 2 * size}).status_code == 200
    r = api.post("/v1/fine_tuning/jobs", json=job, headers=key)  # at the limit: a job would write more
    assert r.status_code == 429 and r.json()["error"]["code"] == "storage_quota_exceeded", r.text

    # null: back to the service's default (10 MB), which leaves room.
    assert api.patch(f"/v1/admin/teams/{team['id']}", json={"max_storage_bytes": None}).json()["max_storage_bytes"] is None
    assert api.get("/v1/usage", headers=key).json()["storage_limit_bytes"] == 10_000_000
    assert api.post("/v1/fine_tuning/jobs", json=job, headers=key).status_code == 200
    admin = api.get("/v1/admin/usage").json()["data"]
    assert next(u for u in admin if u["team_id"] == team["id"])["storage_bytes"] == 2 * size


def test_uploads_at_once_cannot_pass_the_quota_together(quota_api, task_files):
    """Each upload fits alone; the team's row lock lets exactly as many in as fit together."""
    data = task_files[1].read_bytes()
    team = make_team(quota_api, "racers", max_storage_bytes=2 * len(data))
    key = as_key(team["key"])

    def put(_):
        return quota_api.post("/v1/files", files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"},
                              headers=key).status_code

    with ThreadPoolExecutor(6) as pool:
        assert sorted(pool.map(put, range(6))) == [200, 200, 429, 429, 429, 429]
    assert quota_api.get("/v1/usage", headers=key).json()["storage_bytes"] == 2 * len(data)
