"""End-to-end: jobs that continue from a checkpoint, through a real API process and a real Celery worker
process, over HTTP only. Job A trains; B starts from A (its final model) and C from A's mid checkpoint:
each one's step-0 evaluation gives A's policy log-probs at that point with zero reward (its reference is
that starting point), and each shows its parent. A LoRA job's child trains the same adapter further.
Another team naming A's checkpoint gets the answer an unknown id gets; a live child's checkpoint stays."""
from __future__ import annotations

import secrets

import pytest

from tests.service.processes import start_service
from tests.service.support import as_key, make_team

pytestmark = pytest.mark.slow
FAST = {"learning_rate": 5e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 1}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("continue"), "e2e-" + secrets.token_hex(8))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def team(service, task_files):
    with service.client() as c:
        found = make_team(c, "continue-a")
        for name, path in zip(("train", "val"), task_files):
            r = c.post("/v1/files", headers=as_key(found["key"]), data={"purpose": "fine-tune"},
                       files={"file": (path.name, path.read_bytes())})
            assert r.status_code == 200, r.text
            found[name] = r.json()["id"]
    return found


def _body(team: dict, model: str, **training) -> dict:
    return {"model": model, "training_file": team["train"], "validation_file": team["val"],
            "training": {**FAST, **training}, "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}}


def _run(service, team: dict, model: str, **training) -> dict:
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]), json=_body(team, model, **training))
        assert r.status_code == 200, r.text
    job = service.wait_for_job(r.json()["id"], stall_s=120)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"
    return job


def _evals(service, job_id: str) -> dict[int, dict]:
    with service.client() as c:
        log = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
    return {e["data"]["step"]: e["data"] for e in log if e["type"] == "metrics" and "eval_loss" in e["data"]}


def _starts_at(first: dict, before: dict) -> None:
    assert first["eval_logps/chosen"] == pytest.approx(before["eval_logps/chosen"], abs=1e-4)
    assert first["eval_logps/rejected"] == pytest.approx(before["eval_logps/rejected"], abs=1e-4)
    assert first["eval_rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_jobs_continue_from_a_final_model_and_from_a_mid_checkpoint(service, team, tiny_model, task_files):
    a = _run(service, team, tiny_model, max_steps=4, save_steps=2, eval_steps=2)
    a_evals = _evals(service, a["id"])
    assert a_evals[4]["eval_rewards/margins"] > 0  # A learned something its children must start from
    with service.client() as c:
        ckpts = c.get(f"/v1/fine_tuning/jobs/{a['id']}/checkpoints", headers=as_key(team["key"])).json()["data"]
    mid = next(ck for ck in ckpts if not ck["final"] and ck["step_number"] == 2)
    for model, step, checkpoint in ((a["id"], 4, a["fine_tuned_model"]), (mid["id"], 2, mid["id"])):
        child = _run(service, team, model, max_steps=1, eval_on_start=True)
        assert child["model"] == model and child["parent"] == {"checkpoint": checkpoint, "job": a["id"]}
        assert child["training"]["model"] == model and "adapter" not in child["training"]  # no server path
        _starts_at(_evals(service, child["id"])[0], a_evals[step])
    _another_team_gets_not_found(service, team, a, mid, task_files[0])


def _another_team_gets_not_found(service, team, a: dict, mid: dict, train_file) -> None:
    with service.client() as c:
        other = make_team(c, "continue-b")
        r = c.post("/v1/files", headers=as_key(other["key"]), data={"purpose": "fine-tune"},
                   files={"file": (train_file.name, train_file.read_bytes())})
        other |= {"train": r.json()["id"], "val": None}
        for theirs, unknown in ((mid["id"], "ftckpt-" + secrets.token_hex(12)),
                                (a["id"], "ftjob-" + secrets.token_hex(12))):
            answers = [c.post("/v1/fine_tuning/jobs", headers=as_key(other["key"]), json=_body(other, model))
                       for model in (theirs, unknown)]
            assert [r.status_code for r in answers] == [404, 404]
            assert answers[0].json() == {**answers[1].json(), "error": {
                **answers[1].json()["error"], "message": answers[1].json()["error"]["message"].replace(
                    unknown, theirs)}}
        # The team itself: a pre-flight of a job from A's final model reads the checkpoint's tokenizer.
        r = c.post("/v1/fine_tuning/jobs/preflight", headers=as_key(team["key"]), json=_body(team, a["id"]))
        assert r.status_code == 200, r.text
        assert r.json()["data"]["training_file"]["rows_used"] > 0


def test_a_lora_job_continues_its_adapter(service, team, tiny_model):
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    a = _run(service, team, tiny_model, max_steps=2, lora=lora, eval_steps=2)
    child = _run(service, team, a["id"], max_steps=1, eval_on_start=True)
    assert child["training"]["lora"] == a["training"]["lora"] and child["parent"]["job"] == a["id"]
    _starts_at(_evals(service, child["id"])[0], _evals(service, a["id"])[2])
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", headers=as_key(team["key"]), json=_body(team, a["id"], lora=lora))
        assert r.status_code == 400 and r.json()["error"]["param"] == "training.lora"
