"""Integration: /v1/usage?bucket= divides the GPU-seconds of [since, until) into buckets in one query,
on SQLite and PostgreSQL: hand-worked values per bucket, and the buckets sum to the total."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from service.db.models import Run
from tests.service.support import API_KEY, as_key, fresh_postgres, make_settings, make_team, sessions_for, upload

TRAINING = {"max_length": 64, "max_prompt_length": 32}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("usage-buckets") / "data"
    if request.param == "sqlite":
        settings = make_settings(data_dir)
        with TestClient(create_app(settings), headers=as_key(API_KEY)) as c:
            yield c, settings
        return
    with fresh_postgres() as url:
        settings = make_settings(data_dir, database_url=url)
        with TestClient(create_app(settings), headers=as_key(API_KEY)) as c:
            yield c, settings


def _job(client, team: dict, file_path) -> str:
    file_id = upload(client, file_path, headers=as_key(team["key"]))["id"]
    r = client.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]),
                    json={"model": "m", "training_file": file_id, "training": TRAINING})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_buckets_hold_each_runs_share_and_sum_to_the_total(api, task_files):
    client, settings = api
    a, b = make_team(client, "bucket-a"), make_team(client, "bucket-b")
    ja, jb = _job(client, a, task_files[1]), _job(client, b, task_files[1])
    base = int(time.time() // 60) * 60 - 600
    runs = [(ja, a, 1, base + 30, base + 150), (ja, a, 2, base + 100, base + 130), (ja, a, 1, base + 500, None),
            (ja, a, 1, base - 100, base + 10), (jb, b, 1, base, base + 60), (jb, b, 4, base + 600, base + 700)]
    with sessions_for(settings).begin() as s:
        for token, (job, team, gpus, start, end) in enumerate(runs):
            s.add(Run(job_id=job, team_id=team["id"], gpus=gpus, token=token, attempt=1, worker="w",
                      started_at=start, ended_at=end))
    window = {"since": base, "until": base + 600}

    mine = client.get("/v1/usage", headers=as_key(a["key"]), params={**window, "bucket": 60}).json()
    assert [x["gpu_seconds"] for x in mine["buckets"]] == [40, 100, 50, 0, 0, 0, 0, 0, 40, 60]
    assert [(x["start"], x["end"]) for x in mine["buckets"]][:2] == [(base, base + 60), (base + 60, base + 120)]
    assert sum(x["gpu_seconds"] for x in mine["buckets"]) == pytest.approx(mine["gpu_seconds"]) == 290
    assert client.get("/v1/usage", headers=as_key(a["key"]), params=window).json()["buckets"] is None

    # A range that is no multiple of the bucket: the last one ends at until; the sum is still the total.
    odd = {"since": base - 77.5, "until": base + 555.25, "bucket": 70}
    mine = client.get("/v1/usage", headers=as_key(a["key"]), params=odd).json()
    assert len(mine["buckets"]) == 10 and mine["buckets"][-1]["end"] == odd["until"]
    assert sum(x["gpu_seconds"] for x in mine["buckets"]) == pytest.approx(mine["gpu_seconds"], abs=0.01)

    every = {u["team"]: u for u in client.get("/v1/admin/usage", params={**window, "bucket": 300}).json()["data"]}
    assert [x["gpu_seconds"] for x in every["bucket-a"]["buckets"]] == [190, 100]
    assert [x["gpu_seconds"] for x in every["bucket-b"]["buckets"]] == [60, 0]  # its 4-GPU run starts at until
    assert [x["gpu_seconds"] for x in every["default"]["buckets"]] == [0, 0]


@pytest.mark.parametrize("params, param", [
    ({"since": 0, "until": 600, "bucket": 59}, "bucket"),
    ({"until": 600, "bucket": 60}, "bucket"),
    ({"since": 0, "until": 60 * 501, "bucket": 60}, "bucket"),
    ({"since": 0, "until": 600, "bucket": "x"}, "bucket"),
])
def test_bad_buckets_are_refused_naming_the_parameter(api, params, param):
    client, _settings = api
    for route in ("/v1/usage", "/v1/admin/usage"):
        r = client.get(route, params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
