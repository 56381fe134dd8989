"""A job's `model` naming a checkpoint or a job (service.parents), through the real app (SQLite, embedded
broker): what the job keeps and shows, the LoRA base and adapter it resolves to, the 400s of a parent with
no final model or with its files gone, the 404 of another team's, the 409 on deleting a live job's
starting point, the worker failing a job whose starting point went since it was queued, and the
starting point it fetches from the store. The training itself is tests/integration/test_continue.py's
and tests/service/test_e2e_continue.py's."""
from __future__ import annotations

import shutil

import pytest
from sqlalchemy import update

from service import parents
from service.artifacts import LocalStorage
from service.db import jobs
from service.db.models import Checkpoint, Job, JobStatus
from tests.service.support import as_key, make_team, run_on_worker, sessions_for, upload

TRAINING = {"max_length": 32, "max_prompt_length": 16, "max_steps": 2}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}


def _create(client, model: str, train_id: str, headers: dict | None = None, **training):
    return client.post("/v1/fine_tuning/jobs", headers=headers or {}, json={
        "model": model, "training_file": train_id, "training": {**TRAINING, **training},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 4}}}})


def _finished(client, settings, train_id: str, headers: dict | None = None, **training) -> dict:
    """A succeeded job with a mid checkpoint and a final model on disk, as a worker leaves them."""
    job = _create(client, "owner/model", train_id, headers, **training).json()
    with sessions_for(settings).begin() as s:
        ids = {}
        for step, name, marker in ((1, "checkpoint-1", "state.json"), (2, "final", "config.json")):
            directory = settings.data_dir / "jobs" / job["id"] / name
            directory.mkdir(parents=True)
            (directory / marker).write_text("{}")
            ids[name] = jobs.add_checkpoint(s, job["id"], step, f"jobs/{job['id']}/{name}", None,
                                            final=name == "final").id
        s.flush()
        s.execute(update(Job).where(Job.id == job["id"]).values(status=JobStatus.SUCCEEDED.value,
                                                               fine_tuned_model=ids["final"]))
    return {**job, "mid": ids["checkpoint-1"], "final": ids["final"]}


@pytest.fixture
def train_id(client, task_files) -> str:
    return upload(client, task_files[0])["id"]


def test_a_job_from_a_job_keeps_its_id_and_shows_its_parent(client, settings, train_id):
    a = _finished(client, settings, train_id)
    r = _create(client, a["id"], train_id)
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["model"] == a["id"] and b["training"]["model"] == a["id"]
    assert b["parent"] == {"checkpoint": a["final"], "job": a["id"]}
    assert str(settings.data_dir) not in r.text  # no server path in what is stored or shown
    with sessions_for(settings)() as s:
        start = parents.of_job(s, LocalStorage(settings.storage_dir), s.get(Job, b["id"]))
    assert start.model.endswith(f"jobs/{a['id']}/final") and start.adapter is None
    c = _create(client, a["mid"], train_id).json()
    assert c["parent"] == {"checkpoint": a["mid"], "job": a["id"]}
    r = _create(client, "owner/model", train_id, reference_model=a["mid"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "training.reference_model"


def test_a_lora_parent_continues_its_adapter_on_its_base(client, settings, train_id):
    a = _finished(client, settings, train_id, lora=LORA)
    b = _create(client, a["id"], train_id).json()
    assert b["training"]["lora"] == a["training"]["lora"]
    c = _create(client, a["mid"], train_id).json()
    with sessions_for(settings)() as s:
        storage = LocalStorage(settings.storage_dir)
        final, mid = (parents.of_job(s, storage, s.get(Job, j["id"])) for j in (b, c))
    assert final.model == mid.model == "owner/model"
    assert final.adapter.endswith(f"jobs/{a['id']}/final/adapter") and mid.adapter.endswith("checkpoint-1")
    r = _create(client, a["id"], train_id, lora=LORA)
    assert r.status_code == 400 and r.json()["error"]["param"] == "training.lora"


def test_a_parent_without_a_final_model_or_without_files_is_refused(client, settings, train_id):
    running = _create(client, "owner/model", train_id).json()
    r = _create(client, running["id"], train_id)
    assert r.status_code == 400 and r.json()["error"]["code"] == "parent_not_ready"
    a = _finished(client, settings, train_id)
    shutil.rmtree(settings.data_dir / "jobs" / a["id"] / "checkpoint-1")
    r = _create(client, a["mid"], train_id)
    assert r.status_code == 400 and r.json()["error"]["code"] == "parent_checkpoint_deleted"


def test_another_teams_checkpoint_is_not_found(client, settings, task_files):
    team = make_team(client, "owner")
    key = as_key(team["key"])
    a = _finished(client, settings, upload(client, task_files[0], headers=key)["id"], headers=key)
    other = as_key(make_team(client, "other")["key"])
    theirs = upload(client, task_files[0], headers=other)["id"]
    for model, unknown in ((a["mid"], "ftckpt-" + "0" * 24), (a["id"], "ftjob-" + "0" * 24)):
        seen, unseen = (_create(client, m, theirs, other) for m in (model, unknown))
        assert seen.status_code == unseen.status_code == 404
        assert seen.json()["error"]["message"] == unseen.json()["error"]["message"].replace(unknown, model)
        assert seen.json()["error"]["code"] == unseen.json()["error"]["code"] == "model_not_found"
    admin_files = upload(client, task_files[0])["id"]  # the admin sees it, and is told it is another team's
    r = _create(client, a["mid"], admin_files)
    assert r.status_code == 400 and "belongs to team" in r.json()["error"]["message"]


def test_a_live_jobs_starting_point_cannot_be_deleted(client, settings, train_id):
    a = _finished(client, settings, train_id)
    b = _create(client, a["mid"], train_id).json()
    r = client.delete(f"/v1/fine_tuning/jobs/{a['id']}/checkpoints/{a['mid']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "checkpoint_in_use" and b["id"] in r.text
    assert client.post(f"/v1/fine_tuning/jobs/{b['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/fine_tuning/jobs/{a['id']}/checkpoints/{a['mid']}").status_code == 200


def test_the_worker_fails_a_job_whose_starting_point_is_gone(client, settings, train_id):
    a = _finished(client, settings, train_id)
    b = _create(client, a["mid"], train_id).json()
    with sessions_for(settings).begin() as s:  # removed by hand: the API would have refused (409)
        s.delete(s.get(Checkpoint, a["mid"]))
    assert run_on_worker(settings, b["id"]) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{b['id']}").json()
    assert job["error"]["code"] == "parent_checkpoint_deleted" and a["mid"] in job["error"]["message"]


def test_the_worker_materializes_a_starting_point_from_the_store(client, settings, train_id, tmp_path):
    storage = LocalStorage(settings.storage_dir)
    full, lora = _finished(client, settings, train_id), _finished(client, settings, train_id, lora=LORA)
    b, c = (_create(client, a["id"], train_id).json() for a in (full, lora))
    with sessions_for(settings)() as s:
        starts = [parents.of_job(s, storage, s.get(Job, j["id"])) for j in (b, c)]
    local = [parents.materialize(storage, start, tmp_path / j["id"]) for start, j in zip(starts, (b, c))]
    assert local[0].model == str(tmp_path / b["id"] / "model") and local[0].adapter is None
    assert (tmp_path / b["id"] / "model" / "config.json").is_file()
    assert local[1].model == "owner/model" and local[1].adapter == str(tmp_path / c["id"] / "adapter" / "adapter")
    assert not (tmp_path / c["id"] / "model").exists()
