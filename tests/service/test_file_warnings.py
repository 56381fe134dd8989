"""Integration: an upload's valid but suspicious rows (identical pairs, unknown fields) are counted and shown
on the file object, on SQLite and on PostgreSQL; the trainer warns about the same rows (tests/integration)."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.service.support import API_KEY, as_key, fresh_postgres, make_settings

ROW = {"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("warnings") / "data"
    if request.param == "sqlite":
        with TestClient(create_app(make_settings(data_dir)), headers=as_key(API_KEY)) as c:
            yield c
        return
    with fresh_postgres() as url, TestClient(create_app(make_settings(data_dir, database_url=url)),
                                             headers=as_key(API_KEY)) as c:
        yield c


def post(api, rows: list[dict]) -> dict:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = api.post("/v1/files", files={"file": ("w.jsonl", body)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()


def test_identical_pairs_and_unknown_fields_are_shown_on_the_file(api):
    same = {**ROW, "rejected": ROW["chosen"]}
    rows = [ROW, same, {**ROW, "chosen_": "x"}, ROW] + [same] * 12 + [{**ROW, "Group": "g", "nul\x00é": 1}]
    made = post(api, rows)
    assert made["rows"] == len(rows)
    identical, unknown = made["warnings"]
    assert {k: identical[k] for k in ("code", "count", "lines")} == {
        "code": "identical_pair", "count": 13, "lines": [2, *range(5, 14)]}
    assert identical.get("fields") is None and identical["message"]
    assert {k: unknown[k] for k in ("code", "count", "lines", "fields")} == {
        "code": "unknown_fields", "count": 2, "lines": [3, 17], "fields": ["chosen_", "Group", "nul\\u0000é"]}
    # Stored: the same on every read.
    assert api.get(f"/v1/files/{made['id']}").json() == made
    listed = {f["id"]: f for f in api.get("/v1/files", params={"limit": 100}).json()["data"]}
    assert listed[made["id"]]["warnings"] == made["warnings"]


def test_a_clean_file_has_no_warnings(api):
    made = post(api, [ROW, {**ROW, "group": "g"}])
    assert made["warnings"] == []
    assert api.get(f"/v1/files/{made['id']}").json()["warnings"] == []


def test_a_job_on_such_a_file_warns_in_its_events_by_file_name(client, settings, task_files, tiny_model):
    from tests.service.support import run_on_worker

    rows = [json.loads(line) for line in task_files[0].read_text().splitlines()[:16]]
    rows[3]["rejected"] = rows[3]["chosen"]
    made = post(client, rows)
    body = {"model": tiny_model, "training_file": made["id"],
            "training": {"max_steps": 2, "max_length": 64, "max_prompt_length": 32},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 4}}}}
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    assert run_on_worker(settings, r.json()["id"]) == "succeeded"
    log = client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}/events", params={"limit": 100}).json()["data"]
    (warned,) = [e["message"] for e in log if e["level"] == "warn"]
    (identical,) = made["warnings"]
    # The file's own warning, named by the file's id, not by its path on the server.
    assert identical["message"] in warned and made["id"] in warned and str(settings.data_dir) not in warned
