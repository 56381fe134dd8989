"""Integration: faults inside a run of the worker's JobRunner, on the tiny model and a real SQLite store,
in this process (tests/service/test_faults.py injects them into real processes): a worker shutting
down hands its job back after a checkpoint and the next run resumes there; a failed checkpoint write
fails the job and leaves the earlier checkpoints whole; a cancel at any moment ends in `cancelled`, frees
the worker and is the job's last event; a worker refuses a model outside its own DPO_MODEL_DIRS."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

import dpo_core.checkpoint
import dpo_core.metrics
from service.db import jobs, leases
from service.db.models import Job
from tests.service.support import dispatch, register_worker, run_on_worker, sessions_for, upload
from worker import recorder as recorder_module
from worker.runner import JobRunner

FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 1}


def create(client, model, train_id, **training) -> str:
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": model, "training_file": train_id, "training": {**FAST, **training},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8, "beta": 0.1}}}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def events(client, job_id) -> list[dict]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]


def statuses(log: list[dict]) -> list[str]:
    return [e["data"]["status"] for e in log if e["data"] and "status" in e["data"]]


def wait_step(client, job_id, step: int, runner: threading.Thread, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["step"] or 0) < step:
        assert time.monotonic() < deadline and runner.is_alive(), "the job did not reach its step"
        time.sleep(0.05)


@pytest.fixture
def train_id(client, task_files) -> str:
    return upload(client, task_files[0])["id"]


def test_a_worker_shutting_down_hands_its_job_back_and_the_next_run_resumes_there(client, settings, train_id,
                                                                                    tiny_model, monkeypatch):
    job_id = create(client, tiny_model, train_id, max_steps=8)  # no save_steps: the hand-back makes the checkpoint
    worker_id = register_worker(settings)
    asked = []

    def on_step(self, step, total):  # at step 2, what the worker's main process does on SIGTERM
        real_step(self, step, total)
        if step == 2 and not asked:
            with sessions_for(settings).begin() as s:
                asked.extend(leases.request_handback(s, worker_id))

    real_step = recorder_module.JobRecorder.on_step
    monkeypatch.setattr(recorder_module.JobRecorder, "on_step", on_step)
    polls_every_step = settings.model_copy(update={"cancel_poll_interval_s": 1e-6})
    assert run_on_worker(polls_every_step, job_id) == "queued" and asked == [job_id]
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    step = job["progress"]["step"]
    assert job["status"] == "queued" and job["attempts"] == 0 and step == 2
    assert (settings.data_dir / "jobs" / job_id / f"checkpoint-{step}" / "state.json").is_file()
    handed_back = events(client, job_id)[-1]["data"]
    assert (handed_back["status"], handed_back["code"], handed_back["step"]) == ("queued", "handed_back", step)

    monkeypatch.setattr(recorder_module.JobRecorder, "on_step", real_step)
    assert run_on_worker(settings, job_id) == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    log = events(client, job_id)
    assert (job["progress"]["step"], job["attempts"]) == (8, 1)
    assert statuses(log) == ["queued", "running", "queued", "running", "succeeded"]
    starts = [e["data"]["resumed_from_step"] for e in log if (e["data"] or {}).get("code") == "training_started"]
    assert starts == [None, step]
    assert str(settings.data_dir) not in json.dumps(log)  # the resumed run names its step, not the worker's path
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted((c["step_number"], c["final"]) for c in ckpts) == [(step, False), (8, True)]
    metrics = client.get(f"/v1/files/{job['result_files'][0]}/content").text.splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, 9))  # each step once, in order


def test_sigterm_in_the_job_process_checkpoints_and_hands_back(client, settings, train_id, tiny_model):
    """Celery's pool resets SIGTERM in the job process to kill it; the runner makes it a hand-back."""
    job_id = create(client, tiny_model, train_id, max_steps=400)
    worker_id = register_worker(settings)
    dispatch(settings)
    guard = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not end pytest

    def send_sigterm():
        with sessions_for(settings)() as s:
            while (s.get(Job, job_id, populate_existing=True).step or 0) < 2:
                time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=send_sigterm, daemon=True)
    killer.start()
    try:
        assert JobRunner(settings, worker_id).run(job_id) == "queued"  # in this, the main thread
    finally:
        signal.signal(signal.SIGTERM, guard)
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "queued" and 2 <= job["progress"]["step"] < 400
    assert (settings.data_dir / "jobs" / job_id / f"checkpoint-{job['progress']['step']}" / "state.json").is_file()


def test_a_failed_checkpoint_write_fails_the_job_and_keeps_earlier_checkpoints_whole(client, settings, train_id,
                                                                                       tiny_model, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: the disk is full
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(dpo_core.checkpoint.torch, "save", save)
    job_id = create(client, tiny_model, train_id, max_steps=6, save_steps=2)
    assert run_on_worker(settings, job_id) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["error"]["code"] == "checkpoint_error" and "No space left on device" in job["error"]["message"]
    assert "checkpoint-4" in job["error"]["message"] and events(client, job_id)[-1]["data"] == {"status": "failed"}

    out = settings.data_dir / "jobs" / job_id
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-2"]
    assert dpo_core.checkpoint.resolve_resume("auto", str(out)) == str(out / "checkpoint-2")
    progress, _ = dpo_core.checkpoint.load_progress(str(out / "checkpoint-2"))
    assert progress.step == 2
    (ckpt,) = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    blob = client.get(ckpt["download_url"])
    assert ckpt["step_number"] == 2 and blob.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(blob.content)) as tar:
        assert f"{ckpt['id']}/state.json" in tar.getnames()

    # The checkpoint's files removed by hand: 404, not 500; so are a file's bytes.
    import shutil

    shutil.rmtree(out / "checkpoint-2")
    r = client.get(ckpt["download_url"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"
    (settings.data_dir / "files" / f"{train_id}.jsonl").unlink()
    r = client.get(f"/v1/files/{train_id}/content")
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"


def test_a_full_disk_while_training_fails_the_job_with_a_storage_error(client, settings, train_id, tiny_model,
                                                                        monkeypatch):
    def full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(dpo_core.metrics.MetricsFile, "append", full)
    job_id = create(client, tiny_model, train_id, max_steps=4)
    assert run_on_worker(settings, job_id) == "failed"
    error = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["error"]
    assert error["code"] == "storage_error" and "No space left on device" in error["message"]
    assert "metrics.jsonl" in error["message"]


def _cancel(settings, job_id):
    with sessions_for(settings).begin() as s:
        jobs.request_cancel(s, job_id)


@pytest.mark.parametrize("moment", ["queued", "dispatched", "starting", "running", "mid-checkpoint"])
def test_cancel_at_any_moment_ends_cancelled_frees_the_worker_and_is_the_last_event(
        client, settings, train_id, tiny_model, monkeypatch, moment):
    job_id = create(client, tiny_model, train_id, max_steps=400, save_steps=3)
    worker_id = register_worker(settings)
    if moment == "starting":
        real = recorder_module.JobRecorder.on_start
        monkeypatch.setattr(recorder_module.JobRecorder, "on_start",
                            lambda self, info: (real(self, info), _cancel(settings, job_id)))
    elif moment == "running":
        real_step = recorder_module.JobRecorder.on_step
        monkeypatch.setattr(recorder_module.JobRecorder, "on_step", lambda self, step, total: (
            real_step(self, step, total), step == 2 and _cancel(settings, job_id)))
    elif moment == "mid-checkpoint":
        real_save = dpo_core.checkpoint.save_checkpoint
        monkeypatch.setattr(dpo_core.checkpoint, "save_checkpoint",
                            lambda *a, **k: (_cancel(settings, job_id), real_save(*a, **k))[1])
    if moment == "queued":
        _cancel(settings, job_id)
    assert [a.job_id for a in dispatch(settings)] == ([] if moment == "queued" else [job_id])
    if moment == "dispatched":
        _cancel(settings, job_id)
    before = set(threading.enumerate())
    outcome = JobRunner(settings, worker_id).run(job_id)
    assert outcome == ("skipped" if moment in ("queued", "dispatched") else "cancelled")
    # Nothing of the run writes after the end: every thread it started (its lease keeper's) has ended,
    # and its recorder writes only from the run's own calls. So what is read now is final.
    assert [t.name for t in threading.enumerate() if t not in before] == []

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None
    log = events(client, job_id)
    assert log[-1]["data"] == {"status": "cancelled"} and statuses(log).count("cancelled") == 1
    if moment == "mid-checkpoint":
        assert 3 in [e["data"]["step"] for e in log if (e["data"] or {}).get("code") == "checkpoint_saved"]
    other = create(client, tiny_model, train_id, max_steps=1)
    assert [a.job_id for a in dispatch(settings)] == [other]  # the worker is free


def test_a_worker_refuses_a_model_outside_its_own_model_dirs(client, settings, train_id, tiny_model, tmp_path):
    """The API allowed the path; this worker's DPO_MODEL_DIRS does not: it loads nothing and says why."""
    from tests.service.support import make_settings

    job_id = create(client, tiny_model, train_id, max_steps=2)
    worker_settings = make_settings(settings.data_dir, model_dirs=[tmp_path / "elsewhere"])
    worker_id = register_worker(worker_settings)
    dispatch(worker_settings)
    assert JobRunner(worker_settings, worker_id).run(job_id) == "failed"
    error = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["error"]
    assert error["code"] == "model_not_allowed"
    assert tiny_model in error["message"] and "DPO_MODEL_DIRS" in error["message"]  # names the model and the setting
