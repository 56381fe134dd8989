"""Integration: the worker's JobRunner trains the tiny local model for jobs created through the API,
on a real SQLite store, in this process (the end-to-end tier runs it as a Celery worker)."""
from __future__ import annotations

import io
import json
import tarfile
import threading
import time

import pytest

from dpo_core.estimate import model_facts
from service.db.models import Job
from tests.service.support import dispatch, register_worker, run_on_worker, sessions_for, upload
from worker.runner import JobRunner

FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32}


def create(client, model, train_id, val_id=None, **training):
    body = {"model": model, "training_file": train_id, "training": {**FAST, **training},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8, "beta": 0.1}}}}
    if val_id:
        body["validation_file"] = val_id
    r = client.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def events(client, job_id) -> list[dict]:
    return client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]


def test_a_job_trains_and_everything_is_recorded(client, settings, task_files, tiny_model, tmp_path):
    train_id, val_id = (upload(client, p)["id"] for p in task_files)
    job_id = create(client, tiny_model, train_id, val_id, max_steps=12, logging_steps=2, eval_steps=6,
                    eval_on_start=True, save_steps=6)
    assert run_on_worker(settings, job_id) == "succeeded"

    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["error"] is None and job["finished_at"] >= job["started_at"]
    assert job["progress"]["step"] == 12 and job["progress"]["total_steps"] == 12 and job["progress"]["epoch"] > 0
    assert job["trained_tokens"] > 0 and job["metrics"]["step"] == 12 and job["eval_metrics"]["step"] == 12
    assert job["eval_metrics"]["eval_rewards/accuracies"] > 0.5

    log = events(client, job_id)
    statuses = [e["data"]["status"] for e in log if e["data"] and "status" in e["data"]]
    assert statuses == ["queued", "running", "succeeded"]
    assert {"code": "dispatched", "worker": "test-worker"} in [e["data"] for e in log]
    assert job["worker"] == "test-worker" and job["queue_position"] is None and job["queue_reason"] is None
    evals = [e["data"]["step"] for e in log if e["type"] == "metrics" and "eval_loss" in e["data"]]
    assert evals == [0, 6, 12]
    assert [e["data"]["step"] for e in log if e["type"] == "metrics" and "loss" in e["data"]] == [2, 4, 6, 8, 10, 12]

    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [(c["step_number"], c["final"]) for c in ckpts][-1] == (6, False)
    final = next(c for c in ckpts if c["final"])
    assert final["id"] == job["fine_tuned_model"] and final["metrics"]["eval_loss"] is not None
    blob = client.get(final["download_url"]).content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp_path / "dl", filter="data")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "dl" / final["id"])

    (results,) = job["result_files"]
    lines = client.get(f"/v1/files/{results}/content").text.splitlines()
    assert len(lines) == 6 + 3  # train records every 2 steps, plus 3 evaluations

    # What the run measured, which calibrates later estimates (dpo_core.estimate.measured).
    with sessions_for(settings).begin() as s:
        measured = s.get(Job, job_id).measured
    facts = model_facts(tiny_model)
    assert (measured["steps"], measured["tokens"], measured["device"], measured["gpu_type"], measured["gpus"]) == \
        (12, job["trained_tokens"], "cpu", "cpu", 1)
    assert measured["parameters"] == measured["trainable_parameters"] == facts.parameters
    assert measured["tokens_per_s"] == pytest.approx(measured["tokens"] / measured["train_seconds"], rel=0.01)
    assert measured["memory_kind"] == "rss" and measured["peak_memory_bytes"] > 100 << 20  # torch alone is more
    assert measured["flops"] > 8 * facts.body_parameters * measured["tokens"]  # policy and reference, and more
    assert (measured["precision"], measured["lora"], measured["gradient_checkpointing"]) == ("fp32", False, False)


def test_a_model_that_does_not_exist_fails_with_a_clear_one_line_error(client, settings, task_files):
    # A hub id passes the submission check (the API cannot ask the hub); the worker, offline, fails it.
    job_id = create(client, "no-such-org/no-such-model", upload(client, task_files[0])["id"], max_steps=2)
    assert run_on_worker(settings, job_id) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_not_found"
    assert "no-such-model" in job["error"]["message"] and "\n" not in job["error"]["message"]
    assert events(client, job_id)[-1]["data"] == {"status": "failed"}


def test_an_internal_error_shows_the_team_an_error_id_and_logs_the_traceback_under_it(client, settings, task_files,
                                                                                     tiny_model, monkeypatch, caplog):
    import logging
    import re

    import dpo_core

    def broken(spec, callbacks):
        raise KeyError(f"boom in {spec.output_dir}")  # the message of an unforeseen error may hold a server path

    monkeypatch.setattr(dpo_core, "train", broken)
    job_id = create(client, tiny_model, upload(client, task_files[0])["id"])
    with caplog.at_level(logging.ERROR, logger="dpo.worker"):
        assert run_on_worker(settings, job_id) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["error"]["code"] == "internal_error" and "KeyError" in job["error"]["message"]
    error_id = re.search(r"error-[0-9a-f]{24}", job["error"]["message"]).group(0)

    # What the team reads: no traceback, no path of the server's, no message of the error itself.
    seen = json.dumps([job["error"], events(client, job_id)])
    for leak in ("Traceback", "runner.py", str(settings.data_dir), "boom"):
        assert leak not in seen, leak
    assert not re.search(r"(^|[\s'\"(])/\w+/", seen), seen  # no absolute path at all
    failed = [e for e in events(client, job_id) if e["level"] == "error" and e["data"].get("code") == "internal_error"]
    assert [e["data"]["error_id"] for e in failed] == [error_id]

    # What the operator reads: the same id, with the traceback.
    (record,) = [r for r in caplog.records if getattr(r, "error_id", None) == error_id]
    assert job_id in record.getMessage() and error_id in record.getMessage()
    assert isinstance(record.exc_info[1], KeyError)
    text = caplog.text
    assert "Traceback" in text and "in broken" in text and "boom in" in text


def test_a_cancel_stops_a_running_job_within_seconds(client, settings, task_files, tiny_model):
    job_id = create(client, tiny_model, upload(client, task_files[0])["id"], max_steps=100_000, logging_steps=5)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(status=run_on_worker(settings, job_id)))
    runner.start()
    deadline = time.monotonic() + 60
    while (client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["step"] or 0) < 1:
        assert time.monotonic() < deadline and runner.is_alive(), "the job never started stepping"
        time.sleep(0.2)
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert r.json()["status"] == "running" and r.json()["cancel_requested"]
    # A run that missed the cancel would train on for its 100,000 steps, far longer than this bound.
    runner.join(timeout=120)
    assert not runner.is_alive() and outcome["status"] == "cancelled"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None and job["progress"]["step"] < 100_000
    assert events(client, job_id)[-1]["data"] == {"status": "cancelled"}


def test_a_job_cancelled_while_queued_is_skipped(client, settings, task_files, tiny_model):
    worker_id = register_worker(settings)
    job_id = create(client, tiny_model, upload(client, task_files[0])["id"])
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert JobRunner(settings, worker_id).run(job_id) == "skipped"
    assert JobRunner(settings, worker_id).run("ftjob-unknown") == "skipped"


def test_a_worker_only_starts_jobs_dispatched_to_it(client, settings, task_files, tiny_model):
    mine, other = register_worker(settings, "mine"), register_worker(settings, "other", pid=2)
    job_id = create(client, tiny_model, upload(client, task_files[0])["id"])
    assert JobRunner(settings, mine).run(job_id) == "skipped"  # still queued: a stray message starts nothing
    (assignment,) = dispatch(settings)
    stranger = other if assignment.worker_id == mine else mine
    assert JobRunner(settings, stranger).run(job_id) == "skipped"
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"
    from service.db.workers import mark_stopped
    from tests.service.support import sessions_for

    with sessions_for(settings).begin() as s:  # its worker is shutting down (SIGTERM): it starts nothing new
        mark_stopped(s, assignment.worker_id)
    assert JobRunner(settings, assignment.worker_id).run(job_id) == "skipped"


@pytest.mark.parametrize("limit", [1])
def test_pruned_checkpoints_disappear_from_the_list(client, settings, task_files, tiny_model, limit):
    job_id = create(client, tiny_model, upload(client, task_files[0])["id"], max_steps=6, save_steps=2,
                    save_total_limit=limit)
    assert run_on_worker(settings, job_id) == "succeeded"
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted((c["step_number"], c["final"]) for c in ckpts) == [(6, False), (6, True)]
    for c in ckpts:
        assert client.get(c["download_url"]).status_code == 200


def _run_in_child(settings, job_id, hang: bool, deadline: float) -> None:
    """A job process: runs `job_id` (not in the store: skipped) with a start deadline, its start hung if
    `hang`; then sleeps past the deadline."""
    runner = JobRunner(settings, "no-such-worker")
    if hang:
        runner._start = lambda job_id: time.sleep(600)
    runner.run(job_id, start_deadline_s=deadline)
    time.sleep(2 * deadline)  # the deadline ended with the start: nothing may kill the process now


@pytest.mark.parametrize("hang", [True, False], ids=["hung-start", "started"])
def test_a_job_process_stuck_before_its_start_exits_at_the_deadline(client, settings, hang):
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=_run_in_child, args=(settings, "ftjob-x", hang, 1.0))
    child.start()
    child.join(timeout=30)
    assert not child.is_alive()
    # Hung: faulthandler's exit, status 1, long before the 600 s sleep ends. Started (the job is skipped):
    # a normal exit after sleeping past the deadline, which ended with the start.
    assert child.exitcode == (1 if hang else 0)
