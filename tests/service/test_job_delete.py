"""Integration: DELETE /v1/fine_tuning/jobs/{id} removes what an ended job keeps (checkpoints, final model,
result files, events, samples, every stored object under jobs/<id>/), and the team's storage drops by
their bytes; the job row stays, with its usage. Refused (409) while the job has not ended, and while a
job not yet ended starts from one of its checkpoints. On SQLite and PostgreSQL with the local store, and
on PostgreSQL with a real S3 server."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from dpo_core.layout import STATE_FILE
from service.artifacts import make_storage
from service.db import jobs
from service.db.migrate import upgrade
from service.db.models import File, Sample, new_id, now
from tests.service.support import make_settings, sessions_for, upload
from tests.service.test_symlinks import create

CKPT = {STATE_FILE: b"{}", "config.json": b"{}", "model.safetensors": b"w" * 4096}
METRICS = b'{"step": 1, "loss": 0.69}\n'


@pytest.fixture(params=["sqlite", "postgres", "postgres+s3"])
def settings(request, tmp_path):
    extra = {}
    if request.param.startswith("postgres"):
        extra["database_url"] = request.getfixturevalue("postgres_url")
    if request.param.endswith("s3"):
        server = request.getfixturevalue("s3_server")
        extra |= {"storage_url": f"s3://{server.bucket}/{uuid.uuid4().hex}", "s3_endpoint_url": server.endpoint,
                  "storage_presign": False}  # the API streams what the test reads back
    s = make_settings(tmp_path / "data", **extra)
    upgrade(s.db_url)
    return s


def ended_job(client, settings, train_id: str, tmp_path) -> tuple[str, list[str], str]:
    """A cancelled job with two published checkpoints (one final), a result file, events and samples,
    as its run would leave them; (job id, checkpoint ids, result file id)."""
    job_id = create(client, "owner/model", train_id).json()["id"]
    storage = make_storage(settings)
    src = tmp_path / f"src-{job_id}"
    for name, data in CKPT.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    ids = []
    for step, name, final in ((1, "checkpoint-1", False), (2, "final", True)):
        key = f"jobs/{job_id}/{name}"
        with sessions_for(settings).begin() as s:
            ids.append(jobs.add_checkpoint(s, job_id, step, key, None, final=final, size=sum(map(len, CKPT.values()))).id)
        storage.publish_dir(src, key, ids[-1])
    key = f"jobs/{job_id}/metrics.jsonl"
    storage.put_stream(key, [METRICS])
    storage.put_stream(f"jobs/{job_id}/tracking.json", [b"{}"])  # a state object no row names
    results_id = new_id("file")
    with sessions_for(settings).begin() as s:
        s.add(File(id=results_id, team_id="team-default", filename="metrics.jsonl", purpose="fine-tune-results",
                   bytes=len(METRICS), format="metrics", rows=1, status="processed", storage_key=key, created_at=now()))
        jobs.put_samples(s, job_id, 1, [{"prompt": "p"}], {"n": 1})
        jobs.update_job(s, job_id, result_files=[results_id], fine_tuned_model=ids[-1])
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    return job_id, ids, results_id


def samples(settings, job_id: str) -> list[int]:
    with sessions_for(settings)() as s:
        return list(s.scalars(select(Sample.step).where(Sample.job_id == job_id)))


def test_deleting_an_ended_job_removes_what_it_keeps_and_frees_its_storage(client, settings, task_files, tmp_path):
    train_id = upload(client, task_files[0])["id"]
    job_id, ckpt_ids, results_id = ended_job(client, settings, train_id, tmp_path)
    other_id, _, other_results = ended_job(client, settings, train_id, tmp_path)
    storage = make_storage(settings)
    before = client.get("/v1/usage").json()["storage_bytes"]
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    assert samples(settings, job_id) == [1]

    r = client.delete(f"/v1/fine_tuning/jobs/{job_id}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": job_id, "object": "fine_tuning.job", "deleted": True}

    assert client.get("/v1/usage").json()["storage_bytes"] == before - 2 * sum(map(len, CKPT.values())) - len(METRICS)
    assert list(storage.list(f"jobs/{job_id}/")) == [] and not storage.exists(f"jobs/{job_id}")
    base = f"/v1/fine_tuning/jobs/{job_id}"
    assert client.get(f"{base}/checkpoints").json()["data"] == []
    assert client.get(f"{base}/events").json()["data"] == []
    assert samples(settings, job_id) == [] and samples(settings, other_id) == [1]
    assert client.get(f"/v1/files/{results_id}").status_code == 404
    for ckpt_id in ckpt_ids:
        assert client.get(f"{base}/checkpoints/{ckpt_id}/content").status_code == 404
    assert client.get(base).json()["status"] == "cancelled"  # the job itself stays, with its usage
    # Nothing of the other job's, nor the training file, went with it.
    assert len(client.get(f"/v1/fine_tuning/jobs/{other_id}/checkpoints").json()["data"]) == 2
    assert client.get(f"/v1/files/{other_results}/content").content == METRICS
    assert client.get(f"/v1/files/{train_id}/content").content == task_files[0].read_bytes()
    assert storage.dir_exists(f"jobs/{other_id}/final")
    # Deleting it again deletes nothing more.
    assert client.delete(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200


def test_a_job_not_ended_or_whose_checkpoint_a_live_job_starts_from_is_not_deleted(client, settings, task_files,
                                                                                  tmp_path):
    train_id = upload(client, task_files[0])["id"]
    queued = create(client, "owner/model", train_id).json()["id"]
    r = client.delete(f"/v1/fine_tuning/jobs/{queued}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
    assert client.get(f"/v1/fine_tuning/jobs/{queued}/events").json()["data"]

    parent, ckpt_ids, _ = ended_job(client, settings, train_id, tmp_path)
    child = create(client, ckpt_ids[0], train_id)
    assert child.status_code == 200, child.text
    r = client.delete(f"/v1/fine_tuning/jobs/{parent}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "checkpoint_in_use"
    assert child.json()["id"] in r.json()["error"]["message"]
    assert len(client.get(f"/v1/fine_tuning/jobs/{parent}/checkpoints").json()["data"]) == 2
    assert make_storage(settings).dir_exists(f"jobs/{parent}/checkpoint-1")

    client.post(f"/v1/fine_tuning/jobs/{child.json()['id']}/cancel")
    assert client.delete(f"/v1/fine_tuning/jobs/{parent}").status_code == 200
    assert client.delete("/v1/fine_tuning/jobs/ftjob-0").status_code == 404
