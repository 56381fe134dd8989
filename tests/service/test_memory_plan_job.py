"""Integration: a job's memory plan reaches its events, and a job that cannot fit its max_memory fails before
training with `memory_budget`, saying what to change. The worker's JobRunner runs in this process on a real
SQLite store (tests/service/test_worker_runner.py)."""
from __future__ import annotations

from tests.service.support import run_on_worker, upload

TRAINING = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "max_steps": 2}


def _job(client, model: str, train_id: str, **training) -> str:
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": model, "training_file": train_id, "training": {**TRAINING, **training},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _events(client, job_id: str) -> list[dict]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]


def test_the_plan_is_in_the_start_event_and_a_job_that_cannot_fit_fails_early(client, settings, task_files,
                                                                            tiny_model):
    train_id = upload(client, task_files[0])["id"]
    job_id = _job(client, tiny_model, train_id, gradient_checkpointing=True)
    assert run_on_worker(settings, job_id) == "succeeded"
    [started] = [e for e in _events(client, job_id) if (e["data"] or {}).get("code") == "training_started"]
    assert (started["data"]["micro_batch_size"], started["data"]["checkpointed_layers"], started["data"]["layers"]) \
        == (4, 2, 2)
    assert started["data"]["predicted_memory_bytes"] <= started["data"]["memory_budget_bytes"]
    assert "micro batch 4, 2 of 2 layers checkpointed" in started["message"]

    # 256 MiB is below what the runtime alone takes on a CPU (estimate.RUNTIME_BYTES).
    small = _job(client, tiny_model, train_id, max_memory="256MiB")
    assert run_on_worker(settings, small) == "failed"
    error = client.get(f"/v1/fine_tuning/jobs/{small}").json()["error"]
    assert error["code"] == "memory_budget" and "max_memory" in error["message"]
    assert not [e for e in _events(client, small) if (e["data"] or {}).get("code") == "training_started"]
