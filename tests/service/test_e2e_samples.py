"""End-to-end: a job with training.samples through a real API process and a real Celery worker process,
over HTTP only. GET .../samples answers step 0 (the reference's completions) and later steps (the
policy's beside the reference's), with lengths, implicit rewards and a reward model's win rate; another
team's job is 404; a reward model outside the allowed model directories is refused at submission."""
from __future__ import annotations

import secrets

import pytest

from tests.service.processes import start_service
from tests.service.support import as_key, make_team

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("samples"), "e2e-" + secrets.token_hex(8))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    """A tiny sequence-classification Llama over the toy vocabulary, under the tests' model directory."""
    import torch
    from transformers import LlamaForSequenceClassification

    from dpo_core.toy import build_tokenizer, llama_config

    out = tmp_path_factory.mktemp("reward") / "model"
    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    config = llama_config(len(tokenizer))
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(out)
    return str(out)


def _body(model, train_id, val_id, samples) -> dict:
    training = {"learning_rate": 1e-3, "max_length": 64, "max_prompt_length": 32, "logging_steps": 2,
                "max_steps": 8, "eval_steps": 4, "samples": samples}
    return {"model": model, "training_file": train_id, "validation_file": val_id, "training": training,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}}


def test_a_job_with_samples_shows_the_reference_and_the_policy_at_each_step(service, task_files, tiny_model,
                                                                           reward_model):
    with service.client() as admin:
        a, b = make_team(admin, "samples-a"), make_team(admin, "samples-b")
    with service.client() as c:
        c.headers.update(as_key(a["key"]))
        train_id, val_id = (c.post("/v1/files", files={"file": (p.name, p.read_bytes())},
                                   data={"purpose": "fine-tune"}).json()["id"] for p in task_files)
        samples = {"num_prompts": 3, "max_new_tokens": 12, "reward_model": reward_model, "max_share": 1.0}
        r = c.post("/v1/fine_tuning/jobs", json=_body(tiny_model, train_id, val_id, samples))
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        job = service.wait_for_job(job_id, stall_s=120)
        assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"

        latest = c.get(f"/v1/fine_tuning/jobs/{job_id}/samples").json()
        assert latest["steps"] == [0, 4, 8] and latest["step"] == 8
        first = c.get(f"/v1/fine_tuning/jobs/{job_id}/samples", params={"step": 0}).json()
        assert len(first["data"]) == len(latest["data"]) == 3
        for before, after in zip(first["data"], latest["data"]):
            assert before["policy"] == before["reference"]  # at step 0 the policy is the reference
            assert after["prompt"] == before["prompt"] and after["reference"]["text"] == before["reference"]["text"]
            for side in ("reference", "policy"):
                assert 1 <= after[side]["tokens"] <= 12 and isinstance(after[side]["reward"], float)
                assert isinstance(after[side]["score"], float)
        assert first["summary"]["samples/win_rate"] == 0.5 and 0 <= latest["summary"]["samples/win_rate"] <= 1
        missing = c.get(f"/v1/fine_tuning/jobs/{job_id}/samples", params={"step": 3})
        assert missing.status_code == 404 and "0, 4, 8" in missing.json()["error"]["message"]
        log = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
        assert [e["data"]["step"] for e in log if "samples/win_rate" in (e["data"] or {})] == [0, 4, 8]

        other = c.get(f"/v1/fine_tuning/jobs/{job_id}/samples", headers=as_key(b["key"]))
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"


def test_a_reward_model_outside_the_allowed_dirs_is_refused(service, task_files, tiny_model):
    train_id, val_id = service.upload(task_files[0]), service.upload(task_files[1])
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json=_body(tiny_model, train_id, val_id, {"reward_model": "/etc"}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "training.samples.reward_model"
