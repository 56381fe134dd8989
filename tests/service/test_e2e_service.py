"""End-to-end: a real API process and a real Celery worker process, driven over HTTP (the worker's
measurement of a run is read from the database), on the embedded defaults (SQLite + SQLite broker)
and on PostgreSQL + Redis. No mocks."""
from __future__ import annotations

import io
import os
import secrets
import tarfile

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from service.db.engine import make_engine, make_sessionmaker
from service.db.models import Job, Worker

from tests.service.processes import start_service

pytestmark = pytest.mark.slow
FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 2}


@pytest.fixture(scope="module", params=[
    "embedded", pytest.param("postgres+redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def service(request, tmp_path_factory):
    env = {}
    if request.param == "postgres+redis":
        env = {"DPO_DATABASE_URL": request.getfixturevalue("postgres_url"), **request.getfixturevalue("redis_env")}
    svc = start_service(tmp_path_factory.mktemp(request.param.replace("+", "-")), "e2e-" + secrets.token_hex(8), env)
    svc.backend = request.param
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def file_ids(service, task_files):
    ids = []
    with service.client() as c:
        for path in task_files:
            r = c.post("/v1/files", files={"file": (path.name, path.read_bytes())}, data={"purpose": "fine-tune"})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
    return ids


def create_job(service, model, train_id, val_id=None, **training) -> str:
    body = {"model": model, "training_file": train_id, "training": {**FAST, **training},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 8}}}}
    if val_id:
        body["validation_file"] = val_id
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_whole_lifecycle_over_http(service, file_ids, tiny_model, tmp_path):
    job_id = create_job(service, tiny_model, *file_ids, max_steps=16, eval_steps=8, eval_on_start=True, save_steps=8)
    job = service.wait_for_job(job_id)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 16 and job["trained_tokens"] > 0

    with service.client() as c:
        log = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
        ckpts = c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        final = next(ck for ck in ckpts if ck["final"])
        assert final["id"] == job["fine_tuned_model"]
        with c.stream("GET", final["download_url"]) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
            blob = r.read()
    statuses = [e["data"]["status"] for e in log if e["data"] and "status" in e["data"]]
    assert statuses == ["queued", "running", "succeeded"]
    evals = [e["data"] for e in log if e["type"] == "metrics" and "eval_loss" in e["data"]]
    assert [e["step"] for e in evals] == [0, 8, 16]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert sorted(ck["step_number"] for ck in ckpts) == [8, 16, 16]

    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp_path, filter="data")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / final["id"])
    AutoTokenizer.from_pretrained(tmp_path / final["id"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters())]
    assert all(changed), "every parameter should have moved"

    # What the worker measured (the job's process of its own: its peak RSS), and the memory it registered.
    engine = make_engine(service.env.get("DPO_DATABASE_URL") or f"sqlite:///{service.data_dir / 'dpo.sqlite'}")
    with make_sessionmaker(engine).begin() as s:
        measured = s.get(Job, job_id).measured
        memory = s.scalar(select(Worker.memory_bytes).where(Worker.name == "worker"))
    engine.dispose()
    assert (measured["steps"], measured["tokens"], measured["device"]) == (16, job["trained_tokens"], "cpu")
    assert measured["memory_kind"] == "rss" and 200 << 20 < measured["peak_memory_bytes"] < memory
    assert memory == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # a CPU worker: its RAM
    assert measured["train_seconds"] > 0 and measured["flops"] > 0

    # Deleting the ended job removes every object under its prefix, and its bytes leave the team's storage.
    with service.client() as c:
        results = [c.get(f"/v1/files/{f}").json()["bytes"] for f in job["result_files"]]
        before = c.get("/v1/usage").json()["storage_bytes"]
        assert (service.data_dir / "jobs" / job_id / "final").is_dir()
        assert c.delete(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
        assert c.get("/v1/usage").json()["storage_bytes"] == before - sum(ck["bytes"] for ck in ckpts) - sum(results)
        assert c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"] == []
    assert results and not (service.data_dir / "jobs" / job_id).exists()


def test_cancel_stops_a_running_job_and_frees_the_worker(service, file_ids, tiny_model):
    job_id = create_job(service, tiny_model, file_ids[0], max_steps=100_000)
    job = service.wait_for_job(job_id, pred=lambda j: j["metrics"] is not None or j["status"] in ("failed",))
    assert job["status"] == "running", job["error"]
    with service.client() as c:
        # While it runs, /metrics shows it: its worker busy, its step time from its latest record.
        samples = {(s.name, frozenset(s.labels.items())): s.value
                   for f in text_string_to_metric_families(c.get("/metrics").text) for s in f.samples}
        steps = [v for (name, labels), v in samples.items()
                 if name == "dpo_job_step_seconds" and ("job", job_id) in labels]
        assert len(steps) == 1 and steps[0] > 0
        assert sum(v for (name, labels), v in samples.items()
                   if name == "dpo_workers" and ("state", "busy") in labels) == 1
        r = c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    job = service.wait_for_job(job_id, timeout_s=120)  # a missed cancel would train on for 100,000 steps
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None
    # The worker is free again: the next job runs to the end.
    next_id = create_job(service, tiny_model, file_ids[0], max_steps=2)
    assert service.wait_for_job(next_id, stall_s=120)["status"] == "succeeded"


def test_a_model_that_does_not_exist_fails_with_a_clear_error(service, file_ids):
    job_id = create_job(service, "no-such-org/missing-model", file_ids[0], max_steps=2)
    job = service.wait_for_job(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "model_not_found"
    assert "missing-model" in job["error"]["message"]


def test_the_openai_sdk_drives_the_core_flow(service, task_files, tiny_model):
    from openai import OpenAI

    client = OpenAI(base_url=f"{service.url}/v1", api_key=service.key, max_retries=0)
    with task_files[0].open("rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.filename == task_files[0].name
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 8, "n_epochs": 1}}}
    job = client.fine_tuning.jobs.create(model=tiny_model, training_file=uploaded.id, method=method, seed=1,
                                         suffix="sdk", extra_body={"training": {**FAST, "max_steps": 4, "save_steps": 2}})
    assert job.status == "queued" and job.method.type == "dpo"
    assert job.method.dpo.hyperparameters.beta == 0.1
    other = client.fine_tuning.jobs.create(model=tiny_model, training_file=uploaded.id, method=method,
                                           extra_body={"training": {**FAST, "max_steps": 100_000}})

    done = service.wait_for_job(job.id)
    assert done["status"] == "succeeded", done["error"]
    retrieved = client.fine_tuning.jobs.retrieve(job.id)
    assert retrieved.status == "succeeded" and retrieved.fine_tuned_model == done["fine_tuned_model"]
    assert retrieved.trained_tokens > 0
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))  # auto-paginates past 5
    assert any(e.type == "metrics" for e in events) and events[0].data == {"status": "succeeded"}
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert {c.step_number for c in checkpoints} == {2, 4} and all(c.fine_tuning_job_id == job.id for c in checkpoints)
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=100)]

    cancelled = client.fine_tuning.jobs.cancel(other.id)
    assert cancelled.status in ("queued", "running", "cancelled")
    assert service.wait_for_job(other.id, timeout_s=90)["status"] == "cancelled"
