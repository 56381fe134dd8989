"""GET /metrics: who may read it, and that what it says about jobs, queues, workers, run times and
requests matches what the service holds (read back with prometheus_client's own parser)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from service.db.models import Run, Worker
from tests.service.support import API_KEY, as_key, make_settings, make_team, register_worker, run_on_worker, \
    sessions_for, upload

METRICS_TOKEN = "metrics-" + "x" * 32


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "data", metrics_token=METRICS_TOKEN)


def scrape(client, key: str = API_KEY) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, from a scrape parsed by prometheus_client."""
    r = client.get("/metrics", headers=as_key(key))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_the_admin_key_or_the_metrics_token_reads_it_a_team_key_is_refused(client):
    team = make_team(client, "watchers")
    assert client.get("/metrics", headers=as_key(METRICS_TOKEN)).status_code == 200
    assert client.get("/metrics").status_code == 200  # the client's default header: the admin key
    refused = client.get("/metrics", headers=as_key(team["key"]))
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    wrong = client.get("/metrics", headers=as_key("dpo-sk-" + "y" * 43))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    client.headers.pop("Authorization")
    none = client.get("/metrics")
    assert none.status_code == 401 and none.json()["error"]["code"] == "invalid_api_key"
    # The metrics token is no admin key.
    assert client.get("/v1/pool", headers=as_key(METRICS_TOKEN)).status_code == 401


def test_a_scrape_tells_jobs_queues_workers_run_times_and_request_latencies(client, settings, task_files, tiny_model):
    team = make_team(client, "scraped")
    headers = as_key(team["key"])
    train_id = upload(client, task_files[0], headers=headers)["id"]
    body = {"model": tiny_model, "training_file": train_id,
            "training": {"max_steps": 2, "max_length": 64, "logging_steps": 1, "batch_size": 4}}
    ran = client.post("/v1/fine_tuning/jobs", json=body, headers=headers).json()["id"]
    assert run_on_worker(settings, ran) == "succeeded"
    metrics = client.get(f"/v1/fine_tuning/jobs/{ran}", headers=headers).json()["metrics"]
    assert 0 < metrics["step_time_s"] <= metrics["elapsed_s"]  # what dpo_job_step_seconds shows while it runs
    waiting = [client.post("/v1/fine_tuning/jobs", json=body, headers=headers).json()["id"] for _ in range(2)]
    client.post(f"/v1/fine_tuning/jobs/{waiting[1]}/cancel", headers=headers)
    lost = register_worker(settings, "gone", pid=2)
    with sessions_for(settings).begin() as s:  # silent for longer than DPO_WORKER_LOST_AFTER_S
        s.execute(update(Worker).where(Worker.id == lost).values(last_heartbeat_at=time.time() - 3600))
        runs = s.execute(select(Run.started_at, Run.ended_at).where(Run.job_id == ran)).all()
    for _ in range(3):
        assert client.get(f"/v1/fine_tuning/jobs/{waiting[0]}", headers=headers).status_code == 200

    samples = scrape(client, METRICS_TOKEN)
    mine = {"team_id": team["id"], "team": "scraped"}
    assert value(samples, "dpo_jobs", **mine, status="succeeded") == 1
    assert value(samples, "dpo_jobs", **mine, status="queued") == 1
    assert value(samples, "dpo_jobs", **mine, status="cancelled") == 1
    assert value(samples, "dpo_jobs", **mine, status="running") == 0
    assert value(samples, "dpo_queue_depth", **mine) == 1
    assert value(samples, "dpo_workers", state="idle", gpu_type="cpu") == 1  # the test worker the job ran on
    assert value(samples, "dpo_workers", state="lost", gpu_type="cpu") == 1
    assert value(samples, "dpo_workers", state="busy", gpu_type="cpu") == 0
    # The job that ran is in the histogram; the one cancelled while queued never ran, so it is not.
    seconds = sum(end - start for start, end in runs)
    done = {**mine, "status": "succeeded"}
    assert value(samples, "dpo_job_run_seconds_count", **done) == 1
    assert value(samples, "dpo_job_run_seconds_sum", **done) == pytest.approx(seconds)
    assert value(samples, "dpo_job_run_seconds_bucket", **done, le="+Inf") == 1
    assert value(samples, "dpo_job_run_seconds_count", **mine, status="cancelled") is None
    # Requests are labelled by their route's template, not by the job id in their URL.
    route = {"route": "/v1/fine_tuning/jobs/{fine_tuning_job_id}", "method": "GET", "status": "2xx"}
    assert value(samples, "dpo_http_request_duration_seconds_count", **route) == 4  # 3 polls, 1 read above
    assert not any(waiting[0] in dict(labels).get("route", "") for _, labels in samples)
    created = {"route": "/v1/fine_tuning/jobs", "method": "POST", "status": "2xx"}
    assert value(samples, "dpo_http_request_duration_seconds_count", **created) == 3
    assert value(samples, "dpo_http_request_duration_seconds_count", route="<unmatched>", method="GET",
                 status="4xx") is None
    client.get("/v1/no-such-route")
    samples = scrape(client)
    assert value(samples, "dpo_http_request_duration_seconds_count", route="<unmatched>", method="GET",
                 status="4xx") == 1


def test_a_scrape_of_an_empty_service_parses(tmp_path):
    from api.main import create_app

    with TestClient(create_app(make_settings(tmp_path / "empty")), headers=as_key(API_KEY)) as client:
        samples = scrape(client)
    assert value(samples, "dpo_jobs", team_id="team-default", team="default", status="queued") == 0
    assert not any(name == "dpo_workers" for name, _ in samples)


@pytest.mark.postgres
def test_run_times_are_bucketed_in_sql_on_postgresql():
    """The grouped, bucketed query of dpo_job_run_seconds on PostgreSQL: a job's runs add up, jobs still
    running or never run are left out."""
    from service.db.migrate import upgrade
    from service.db.models import DEFAULT_TEAM_ID, Job
    from service.metrics import JOB_SECONDS_BUCKETS, read_snapshot
    from tests.service.support import fresh_postgres

    with fresh_postgres() as url:
        upgrade(url)
        settings = make_settings(Path("/nonexistent"), database_url=url)

        def job(job_id: str, status: str, *runs: tuple[float, float | None]) -> None:
            s.add(Job(id=job_id, team_id=DEFAULT_TEAM_ID, status=status, model="m", training_file="file-x",
                      method={}, hyperparameters={}, spec={}))
            s.flush()
            for token, (start, end) in enumerate(runs):
                s.add(Run(job_id=job_id, team_id=DEFAULT_TEAM_ID, gpus=1, token=token, attempt=token + 1,
                          started_at=start, ended_at=end))

        with sessions_for(settings).begin() as s:
            job("ftjob-a", "succeeded", (0.0, 20.0), (100.0, 125.0))  # 45 s over two runs
            job("ftjob-b", "succeeded", (0.0, 5.0))
            job("ftjob-c", "running", (0.0, None))
            job("ftjob-d", "cancelled")
        with sessions_for(settings)() as s:
            snap = read_snapshot(s, settings)
    counts, total = snap.job_seconds[(DEFAULT_TEAM_ID, "succeeded")]
    assert total == pytest.approx(50.0) and counts[-1] == 2
    assert counts[:3] == [1, 1, 2] and JOB_SECONDS_BUCKETS[:3] == (10, 30, 60)  # 5 s, then 45 s
    assert set(snap.job_seconds) == {(DEFAULT_TEAM_ID, "succeeded")}
    assert snap.jobs[(DEFAULT_TEAM_ID, "running")] == 1
