"""Integration: a job whose training diverges ends `failed` with `training_diverged`, never `succeeded`;
its earlier checkpoints stay listed and downloadable, finite. The worker's JobRunner runs in this process
on a real SQLite store (tests/service/test_worker_runner.py)."""
from __future__ import annotations

import io
import tarfile

import torch
from safetensors.torch import load_file

from tests.diverging import SPEC, poisoned_model, poisoned_rows
from tests.service.support import run_on_worker, upload

DIVERGES_AT = 5


def test_a_diverged_job_fails_with_training_diverged_and_keeps_its_finite_checkpoints(
        client, settings, task_files, tiny_model, tmp_path_factory, tmp_path):
    """The model and data of tests/diverging.py give a NaN loss at step 5 exactly, every parameter valid
    (the API refuses absurd numbers, so they cannot be what makes this job diverge)."""
    model = poisoned_model(tiny_model, tmp_path_factory.mktemp("poisoned") / "model")  # under DPO_MODEL_DIRS
    data = poisoned_rows(task_files[0], tmp_path / "train.jsonl", DIVERGES_AT, batch_size=8, seed=42)
    body = {"model": model, "training_file": upload(client, data)["id"], "seed": 42,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}},
            "training": {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
                         "max_steps": 10, "save_steps": 2, "logging_steps": 1, **SPEC}}
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]

    # Metrics events at most once an hour: only the first is due, and the rest waits for the end of the run.
    quiet = settings.model_copy(update={"metrics_event_interval_s": 3600})
    assert run_on_worker(quiet, job_id) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "training_diverged"
    assert f"step {DIVERGES_AT}" in job["error"]["message"] and "learning_rate" in job["error"]["message"]
    assert job["fine_tuned_model"] is None and job["progress"]["step"] == DIVERGES_AT - 1
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "loss" in e["data"]]
    assert steps == [DIVERGES_AT - 1, 1]  # newest first: the last finite record is written before the failure
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [(c["step_number"], c["final"]) for c in ckpts] == [(4, False), (2, False)]
    for c in ckpts:
        r = client.get(c["download_url"])
        assert r.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            tar.extractall(tmp_path / "dl", filter="data")
        weights = load_file(tmp_path / "dl" / c["id"] / "model.safetensors")
        assert weights and all(torch.isfinite(t).all() for t in weights.values())
