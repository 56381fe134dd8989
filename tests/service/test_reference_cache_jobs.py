"""A team's cache of precomputed reference log-probs, through the worker's real path (JobRunner, in this
process) on the local store and on a real S3 server: a team's second job reuses what its first computed,
another team's job with the same model and data does not, and neither the orphan sweep nor deleting the
job removes the cached tables; the cache keeps its size bound, the least recently used going first."""
from __future__ import annotations

import os

import pytest

from service import reference_cache
from service.artifacts import LocalStorage, make_storage
from service.sweep import sweep
from tests.service.support import as_key, make_team, run_on_worker, sessions_for, store_settings, upload

TRAINING = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "max_steps": 2,
            "reference_mode": "precomputed"}


@pytest.fixture(params=["local", "s3"])
def settings(request, tmp_path):
    return store_settings(request, tmp_path / "data")


def _job(client, team, model, file_id, beta) -> str:
    r = client.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]), json={
        "model": model, "training_file": file_id, "training": TRAINING,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8, "beta": beta}}}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _cache_codes(client, job_id) -> list[str]:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
    return [e["data"]["code"] for e in events if (e.get("data") or {}).get("code", "").startswith("reference_cache")]


def _cached(storage, team) -> list[str]:
    return sorted(o.key for o in storage.list(reference_cache.team_prefix(team["id"])))


def test_a_teams_next_job_reuses_its_tables_and_no_other_team_reads_them(client, settings, task_files, tiny_model):
    storage = make_storage(settings)
    a, b = make_team(client, "team-a"), make_team(client, "team-b")
    file_a = upload(client, task_files[0], headers=as_key(a["key"]))["id"]
    file_b = upload(client, task_files[0], headers=as_key(b["key"]))["id"]  # the same bytes

    first = _job(client, a, tiny_model, file_a, beta=0.1)
    assert run_on_worker(settings, first) == "succeeded"
    assert _cache_codes(client, first) == ["reference_cache_stored"]
    (stored,) = _cached(storage, a)
    second = _job(client, a, tiny_model, file_a, beta=0.3)
    assert run_on_worker(settings, second) == "succeeded"
    assert _cache_codes(client, second) == ["reference_cache_hit"]

    other = _job(client, b, tiny_model, file_b, beta=0.1)
    assert run_on_worker(settings, other) == "succeeded"
    assert _cache_codes(client, other) == ["reference_cache_stored"]  # the same key, its own team's cache
    assert [k.rsplit("/", 1)[1] for k in _cached(storage, b)] == [stored.rsplit("/", 1)[1]]

    assert client.delete(f"/v1/fine_tuning/jobs/{first}").status_code == 200
    sweep(sessions_for(settings), storage, min_age_s=0)
    assert _cached(storage, a) == [stored] and len(_cached(storage, b)) == 1


def test_the_cache_keeps_the_most_recently_used_within_its_bytes(tmp_path):
    storage, team = LocalStorage(tmp_path / "store"), "team-x"
    tables = tmp_path / "t.pt"
    tables.write_bytes(b"x" * 100)
    for age, key in enumerate(["c" * 40, "b" * 40, "a" * 40]):  # a: the newest, c: the oldest
        storage.put_file(reference_cache.object_key(team, key), tables)
        os.utime(storage.path(reference_cache.object_key(team, key)), (1000 - age, 1000 - age))
    assert reference_cache.fetch(storage, team, "c" * 40, tmp_path / "used.pt")  # c used now: the newest
    assert not reference_cache.fetch(storage, team, "d" * 40, tmp_path / "none.pt")
    assert reference_cache.put(storage, team, "e" * 40, tables, max_bytes=250)
    assert _cached(storage, {"id": team}) == [reference_cache.object_key(team, k * 40) for k in "ce"]
    assert not reference_cache.put(storage, team, "f" * 40, tables, max_bytes=50)  # larger than the whole cache
    assert _cached(storage, {"id": team}) == []
    with pytest.raises(ValueError):
        reference_cache.object_key(team, "../../jobs/x")
