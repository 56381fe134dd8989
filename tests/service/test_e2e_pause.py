"""End-to-end: pausing and resuming a job through the openai SDK against a real API process and a real
Celery worker process (embedded defaults). A job paused mid-training checkpoints, frees its worker
(another job runs meanwhile) and costs no GPU time while paused; resumed, it goes on from that
checkpoint and its loss curve is an unpaused run's of the same spec."""
from __future__ import annotations

import json
import secrets
import time

import openai
import pytest

from tests.service.processes import start_service

pytestmark = pytest.mark.slow
TRAINING = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
            "logging_steps": 1, "max_steps": 40}
METHOD = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 4}}}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    # The run looks for a pause at every step, so the pause lands mid-run however quick the tiny model's steps.
    svc = start_service(tmp_path_factory.mktemp("pause"), "e2e-" + secrets.token_hex(8),
                        {"DPO_CANCEL_POLL_INTERVAL_S": "0.01"})
    yield svc
    svc.stop()


def losses(service, job: dict) -> dict[int, float]:
    with service.client() as c:
        text = c.get(f"/v1/files/{job['result_files'][0]}/content").text
    records = [json.loads(line) for line in text.splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def status_log(service, job_id: str) -> list[dict]:
    with service.client() as c:
        log = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
    return [e["data"] for e in log if (e["data"] or {}).get("status") or (e["data"] or {}).get("code")
            == "training_started"]


def running_from_step_1(service, job_id: str, timeout_s: float = 120) -> dict:
    """The job once it has run a step (or ended), polled often: the pause must land well before its end."""
    deadline = time.monotonic() + timeout_s
    with service.client() as c:
        while True:
            job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if (job["progress"]["step"] or 0) >= 1 or job["status"] not in ("queued", "running"):
                return job
            assert time.monotonic() < deadline, f"job {job_id} did not start\n{service.logs()}"
            time.sleep(0.02)


def gpu_seconds(service) -> float:
    with service.client() as c:
        return c.get("/v1/usage").json()["gpu_seconds"]


def test_a_paused_job_frees_its_worker_and_resumes_with_the_loss_curve_of_an_unpaused_run(
        service, task_files, tiny_model):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key=service.key, max_retries=0)
    with task_files[0].open("rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id

    def create():
        return client.fine_tuning.jobs.create(model=tiny_model, training_file=file_id, method=METHOD, seed=3,
                                              extra_body={"training": TRAINING}).id

    job_id = create()
    started = running_from_step_1(service, job_id)
    assert started["status"] == "running", started["error"]
    asked = client.fine_tuning.jobs.pause(job_id)
    assert asked.status == "running" and asked.pause_requested, asked
    paused = service.wait_for_job(job_id, until=("paused",), timeout_s=60)
    step = paused["progress"]["step"]
    assert 1 <= step < 40 and paused["worker"] is None and paused["attempts"] == 0
    assert (service.data_dir / "jobs" / job_id / f"checkpoint-{step}" / "state.json").is_file()
    assert client.fine_tuning.jobs.retrieve(job_id).status == "paused"

    # Its worker is free: its GPU time stands still, and another job (the same spec, never paused) runs to its
    # end meanwhile.
    service.wait_for_worker("worker", "idle")
    before = gpu_seconds(service)
    time.sleep(1)
    assert gpu_seconds(service) == pytest.approx(before), "GPU-seconds grew while the job was paused"
    straight = service.wait_for_job(create(), stall_s=120)
    assert straight["status"] == "succeeded", straight["error"]
    assert client.fine_tuning.jobs.retrieve(job_id).status == "paused"

    assert client.fine_tuning.jobs.resume(job_id).status == "queued"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job_id)  # not paused any more
    done = service.wait_for_job(job_id, stall_s=120)
    assert done["status"] == "succeeded", f"{done['error']}\n{service.logs()}"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job_id)  # finished
    log = status_log(service, job_id)
    assert [d["status"] for d in log if "status" in d] == ["queued", "running", "paused", "queued", "running",
                                                           "succeeded"]
    assert [d["resumed_from_step"] for d in log if d.get("code") == "training_started"] == [None, step]
    assert [d.get("code") for d in log if d.get("status") in ("paused", "queued")][1:] == ["paused", "resumed"]
    assert (done["attempts"], done["progress"]["step"]) == (1, 40)

    a, b = losses(service, done), losses(service, straight)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for k in a:
        assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])
