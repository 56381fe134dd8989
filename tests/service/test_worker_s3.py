"""The worker on an S3 store (a real SeaweedFS, tests/s3server.py). worker.publisher's background
process uploads checkpoints in order, deletes pruned ones, and raises a refused upload as OSError
(EIO). The JobRunner, in this process, for two workers that share nothing but the database and the
store (each its own data and scratch directory): a job handed back by one after a checkpoint resumes
on the other from the store; its checkpoints, final model and metrics are objects in the store,
recorded only once whole there."""
from __future__ import annotations

import errno
import functools
import json
import shutil
import uuid

import pytest
from sqlalchemy import delete

from dpo_core.layout import STATE_FILE, checkpoint_dir
from service.artifacts import LocalStorage, make_storage, upload_key
from service.db import leases, workers
from service.db.models import Checkpoint
from tests.s3server import s3_settings
from tests.service.support import API_KEY, MODEL_DIRS, register_worker, run_on_worker, sessions_for, upload
from tests.service.stores import JOB, make, write_checkpoint
from worker import recorder as recorder_module
from worker.publisher import CHECKPOINT, DELETE

FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 1}


@pytest.fixture
def settings(s3_server, tmp_path):
    """The API's and the first worker's settings: a data directory of their own, the store in S3."""
    return s3_settings(s3_server, tmp_path / "a", api_key=API_KEY, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                       broker_url=None, metrics_event_interval_s=0, cancel_poll_interval_s=1e-6, dispatcher=False,
                       webhook_delivery=False, model_dirs=list(MODEL_DIRS))


def _in_store(settings, client, path) -> str:
    """A file uploaded through the API, and in the store the workers read."""
    file_id = upload(client, path)["id"]
    storage = make_storage(settings)
    if not storage.exists(upload_key(file_id)):  # an API that keeps its uploads on its own disk
        storage.put_file(upload_key(file_id), LocalStorage(settings.data_dir).path(upload_key(file_id)))
    return file_id


def test_a_job_handed_back_on_one_worker_resumes_on_another_from_the_store(client, settings, task_files,
                                                                            tiny_model, tmp_path, monkeypatch):
    train_id = _in_store(settings, client, task_files[0])
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": tiny_model, "training_file": train_id, "training": {**FAST, "max_steps": 6},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8, "beta": 0.1}}}})
    job_id = r.json()["id"]
    storage, prefix = make_storage(settings), f"jobs/{job_id}"
    worker_a = register_worker(settings, "worker-a")
    real_step = recorder_module.JobRecorder.on_step

    def on_step(self, step, total):  # at step 2, what worker A's main process does on SIGTERM
        real_step(self, step, total)
        if step == 2:
            with sessions_for(settings).begin() as s:
                leases.request_handback(s, worker_a)

    monkeypatch.setattr(recorder_module.JobRecorder, "on_step", on_step)
    assert run_on_worker(settings, job_id, "worker-a") == "queued"
    monkeypatch.setattr(recorder_module.JobRecorder, "on_step", real_step)
    # The hand-back's checkpoint is whole in the store, and recorded under the id it was published as.
    assert storage.list_dirs(prefix) == [f"{prefix}/checkpoint-2"]
    (ckpt,) = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert ckpt["id"] == storage._manifest(f"{prefix}/checkpoint-2")["arcname"]
    assert not (settings.data_dir / "jobs").exists()  # nothing of the job on worker A's disk...
    assert not any((settings.worker_scratch_dir / worker_a).iterdir())  # ...its scratch emptied
    with sessions_for(settings).begin() as s:  # as if worker A had died between the publish and its row
        s.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))
        workers.mark_stopped(s, worker_a)  # and had left the pool

    b = settings.model_copy(update={"data_dir": tmp_path / "b", "worker_scratch_dir": tmp_path / "b" / "scratch",
                                    "database_url": settings.db_url})
    assert run_on_worker(b, job_id, "worker-b") == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (job["progress"]["step"], job["attempts"], job["worker"]) == (6, 1, "worker-b")
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert sorted((c["step_number"], c["final"]) for c in ckpts) == [(2, False), (6, True)]
    assert next(c["id"] for c in ckpts if not c["final"]) == ckpt["id"]
    final = next(c for c in ckpts if c["final"])
    assert final["id"] == job["fine_tuned_model"] == storage._manifest(f"{prefix}/final")["arcname"]
    assert sorted(storage.list_dirs(prefix)) == [f"{prefix}/checkpoint-2", f"{prefix}/final"]
    local = storage.fetch_dir(f"{prefix}/final", tmp_path / "final")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(local)
    assert not (local / STATE_FILE).exists()
    (results,) = job["result_files"]
    with sessions_for(settings)() as s:
        from service.db.models import File

        key = s.get(File, results).storage_key
    lines = b"".join(storage.read_range(key, 0, storage.size(key) - 1)).decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7))  # each step once, in order
    assert not (b.data_dir / "jobs").exists() and not any((b.worker_scratch_dir / worker_a).parent.glob("*/ftjob-*"))


def test_the_publisher_uploads_in_the_background_in_order_and_deletes_pruned_checkpoints(s3_server, tmp_path):
    settings = s3_settings(s3_server, tmp_path / "data")
    storage, output, done = make_storage(settings), tmp_path / "run" / "output", []
    output.mkdir(parents=True)
    pub = make(storage, output, done, None, functools.partial(make_storage, settings))
    try:
        assert pub.stage  # an object store: staged, and uploaded by the background process
        for step in (1, 2, 3):
            write_checkpoint(output, step)
            if step == 3:
                shutil.rmtree(checkpoint_dir(output, 1))
            pub.checkpoint(step, checkpoint_dir(output, step))
        pub.drain()
    finally:
        pub.close()
    prefix = f"jobs/{JOB}"
    assert [(t.kind, t.step) for t in done] == [(CHECKPOINT, 1), (CHECKPOINT, 2), (DELETE, 1), (CHECKPOINT, 3)]
    assert storage.list_dirs(prefix) == [f"{prefix}/checkpoint-2", f"{prefix}/checkpoint-3"]
    for task in done[1:2] + done[3:]:  # the checkpoints kept: each tar under its row's id
        assert storage._manifest(task.key)["arcname"] == task.checkpoint_id
    fetched = storage.fetch_dir(f"{prefix}/checkpoint-3", tmp_path / "back")
    assert (fetched / "model.safetensors").read_bytes() == (checkpoint_dir(output, 3) / "model.safetensors").read_bytes()
    lines = b"".join(storage.read_range(f"{prefix}/state/metrics.jsonl", 0, storage.size(f"{prefix}/state/metrics.jsonl") - 1))
    assert [json.loads(line)["step"] for line in lines.decode().splitlines()] == [1, 2, 3]


def test_a_store_that_refuses_the_upload_is_an_eio_oserror(s3_server, tmp_path):
    from tests.service.stores import s3_with_keys
    factory = functools.partial(s3_with_keys, s3_server.endpoint, s3_server.bucket, uuid.uuid4().hex,
                                "not-a-key", "not-a-secret")
    output, done = tmp_path / "output", []
    output.mkdir()
    pub = make(factory(), output, done, None, factory)
    try:
        write_checkpoint(output, 1)
        pub.checkpoint(1, checkpoint_dir(output, 1))
        with pytest.raises(OSError) as err:
            pub.drain()
        assert err.value.errno == errno.EIO
    finally:
        pub.close()
    assert done == []
