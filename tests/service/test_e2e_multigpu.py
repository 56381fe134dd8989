"""A job with gpus: 2 through the whole service: a worker that offers 2 (CPU) devices runs it as two
gloo ranks under the elastic launcher; a rank that dies fails the job and leaves no process behind."""
from __future__ import annotations

import os
import secrets
import signal
import time

import psutil
import pytest

from tests.service.processes import start_service

pytestmark = pytest.mark.slow
FAST = {"learning_rate": 1e-3, "micro_batch_size": 2, "max_length": 64, "max_prompt_length": 32, "logging_steps": 1,
        "device": "cpu"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("multigpu"), "mg-" + secrets.token_hex(8),
                        {"DPO_WORKER_GPUS": "2", "DPO_WORKER_GPU_TYPE": "cpu"})
    yield svc
    svc.stop()


def _submit(service, model, file_id, **training) -> str:
    body = {"model": model, "training_file": file_id, "gpus": 2, "training": {**FAST, **training},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 8}}}}
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _ranks(service) -> list[psutil.Process]:
    """Live rank processes under the worker (a zombie is dead already: its parent just hasn't reaped it)."""
    worker = psutil.Process(service.procs["worker"].pid)
    found = []
    for p in worker.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue  # it ended while we looked
    return found


def test_a_two_gpu_job_runs_as_two_ranks_end_to_end(service, file_id, tiny_model):
    job_id = _submit(service, tiny_model, file_id, max_steps=6, save_steps=3, distributed="fsdp")
    job = service.wait_for_job(job_id, stall_s=120)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"
    assert job["progress"]["step"] == 6 and job["trained_tokens"] > 0
    with service.client() as c:
        events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
        ckpts = c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    (started,) = [e["data"] for e in events if (e["data"] or {}).get("code") == "training_started"]
    assert started["world_size"] == 2
    assert sorted(c["step_number"] for c in ckpts) == [3, 6, 6]
    assert any(e["type"] == "metrics" for e in events)


def test_cancel_reaches_every_rank(service, file_id, tiny_model):
    job_id = _submit(service, tiny_model, file_id, max_steps=100_000)
    service.wait_for_job(job_id, pred=lambda j: (j["progress"]["step"] or 0) >= 2 or j["status"] == "failed",
                         timeout_s=240)
    with service.client() as c:
        c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert service.wait_for_job(job_id, timeout_s=120)["status"] == "cancelled"  # not its 100,000 steps
    _wait_no_ranks(service)


def test_a_killed_rank_fails_the_job_and_leaves_no_process(service, file_id, tiny_model):
    job_id = _submit(service, tiny_model, file_id, max_steps=100_000)
    service.wait_for_job(job_id, pred=lambda j: (j["progress"]["step"] or 0) >= 2 or j["status"] == "failed",
                         timeout_s=240)
    ranks = _ranks(service)
    assert len(ranks) == 2, service.logs()
    os.kill(ranks[1].pid, signal.SIGKILL)
    job = service.wait_for_job(job_id, timeout_s=120)
    assert job["status"] == "failed" and job["error"]["code"] == "rank_failed", job["error"]
    assert "rank 1" in job["error"]["message"]
    _wait_no_ranks(service)



def _wait_no_ranks(service, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while _ranks(service) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not _ranks(service), "rank processes left behind"
