"""End-to-end: a job with early stopping through a real API process and a real Celery worker process,
over HTTP only. It ends succeeded at the step early stopping chose, its final model is its best
checkpoint's weights, and its job object lists the diagnostics its training raised."""
from __future__ import annotations

import io
import json
import secrets
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.service.processes import start_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("early-stop"), "e2e-" + secrets.token_hex(8))
    yield svc
    svc.stop()


def _flipped(held_out: Path, out: Path) -> Path:
    """The held-out pairs with chosen and rejected swapped: the more the model learns, the worse it does."""
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    out.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    return out


def _weights(client, checkpoint: dict, into: Path) -> dict[str, torch.Tensor]:
    with client.stream("GET", checkpoint["download_url"]) as r:
        assert r.status_code == 200
        blob = r.read()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return load_file(into / checkpoint["id"] / "model.safetensors")


def test_early_stopping_ends_the_job_with_the_best_checkpoint_as_its_model(service, task_files, tiny_model,
                                                                          tmp_path):
    train_id = service.upload(task_files[0])
    val_id = service.upload(_flipped(task_files[1], tmp_path / "flipped.jsonl"))
    # A learning rate far too high: both rewards fall (a diagnostic), and the flipped validation loss rises.
    training = {"learning_rate": 5e-2, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
                "logging_steps": 1, "max_steps": 40, "eval_steps": 2, "early_stopping": {"patience": 2}}
    body = {"model": tiny_model, "training_file": train_id, "validation_file": val_id, "training": training,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}}
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
    job = service.wait_for_job(job_id, stall_s=120)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"
    stopped = job["early_stopped_at_step"]
    assert stopped is not None and job["progress"]["step"] == stopped < 40

    with service.client() as c:
        log = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
        ckpts = c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        evals = {e["data"]["step"]: e["data"]["eval_loss"] for e in log if e["type"] == "metrics"
                 and "eval_loss" in e["data"]}
        best = min(evals, key=evals.get)
        final = next(ck for ck in ckpts if ck["final"])
        assert final["id"] == job["fine_tuned_model"] and final["step_number"] == best
        at_best = next(ck for ck in ckpts if not ck["final"] and ck["step_number"] == best)
        assert all(torch.equal(a, b) for a, b in zip(_weights(c, final, tmp_path).values(),
                                                       _weights(c, at_best, tmp_path).values()))
    assert sorted(evals)[-1] == stopped and [s for s in sorted(evals) if s > best] == sorted(evals)[-2:]
    ended = [e for e in log if (e["data"] or {}).get("code") == "early_stopped"]
    assert len(ended) == 1 and ended[0]["data"] == {"code": "early_stopped", "step": stopped, "best_step": best}

    codes = [w["code"] for w in job["warnings"]]
    assert "rewards_both_falling" in codes and len(codes) == len(set(codes)), job["warnings"]
    warned = next(e for e in log if e["level"] == "warn" and (e["data"] or {}).get("code") == "rewards_both_falling")
    shown = next(w for w in job["warnings"] if w["code"] == "rewards_both_falling")
    assert warned["message"] == shown["message"] and warned["data"]["step"] == shown["step"]
    assert len(warned["data"]["rewards/chosen"]) == 5
