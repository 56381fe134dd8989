"""Integration: a job at the top of the learning-rate and beta ranges, through the API and the worker's
JobRunner (in this process, on SQLite), never ends `succeeded` with a model that holds a non-finite
weight: it trains to finite weights, or it fails as diverged."""
from __future__ import annotations

import io
import tarfile

import torch

from tests.service.support import run_on_worker, upload


def test_the_top_of_the_learning_rate_and_beta_ranges_gives_no_non_finite_model(client, settings, task_files,
                                                                                tiny_model, tmp_path):
    train_id = upload(client, task_files[0])["id"]
    body = {"model": tiny_model, "training_file": train_id,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 100, "batch_size": 4}}},
            "training": {"learning_rate": 0.1, "max_grad_norm": None, "max_steps": 6, "max_length": 64,
                         "logging_steps": 1}}
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    status = run_on_worker(settings, job_id)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    if status == "failed":
        assert job["error"]["code"] == "training_diverged", job["error"]
        return
    assert status == "succeeded" and job["training"]["learning_rate"] == 0.1 and job["training"]["loss"]["beta"] == 100
    final = next(c for c in client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"] if c["final"])
    with tarfile.open(fileobj=io.BytesIO(client.get(final["download_url"]).content)) as tar:
        tar.extractall(tmp_path / "final", filter="data")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(next((tmp_path / "final").rglob("config.json")).parent)
    assert all(torch.isfinite(p).all() for p in model.parameters())
