"""End to end on the multi-machine shape: an API and two workers that share no directory (each its own
DPO_DATA_DIR, so its own scratch), only PostgreSQL, Redis and a real S3 server (SeaweedFS). A worker
SIGKILLed mid-training and another SIGKILLed mid-upload: each job resumes on the other worker from the
latest complete checkpoint in the store, the first with the loss curve of a run that was never
interrupted, the second without the API ever listing the checkpoint whose upload was cut. The final
model comes through a presigned URL (a 307, then no API key), loads with from_pretrained, and the URL
answers Range requests. Nothing of a job stays in any worker's scratch once it has ended.

Every worker caps its uploads (DPO_UPLOAD_MAX_BYTES_PER_S), so that a checkpoint larger than one
multipart part (the "mid" model's, about 19.5 MB) is in the store's list of multipart uploads for
seconds: that is how the test sees an upload in progress."""
from __future__ import annotations

import io
import json
import secrets
import tarfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.service.processes import TERMINAL, WORKER, new_service

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 1}
UPLOAD_CAP = 3_000_000  # bytes/s: the mid model's checkpoint takes ~6 s to upload, the tiny one's ~0.4 s
STALL_S = 120
# Two layers of hidden size 256 on the toy vocabulary: 1.6M parameters, a 19.5 MB checkpoint (weights and
# Adam's state), more than one multipart part (16 MiB), and steps as quick as the tiny model's.
MID_SHAPE = dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=704)


class Cluster:
    """The service (API) and its workers, each worker in a data directory of its own."""

    def __init__(self, root: Path, env: dict[str, str], store):
        self.store = store
        self.svc = new_service(root / "api", "store-" + secrets.token_hex(12), env)
        self.worker_dirs: dict[str, Path] = {}
        self.jobs: list[str] = []  # every job the tests submitted
        self.mid_job: str | None = None  # the job killed mid-upload

    def start_workers(self, **dirs: Path) -> None:
        """Start workers named after the keys, each with DPO_DATA_DIR the value; wait until all are live."""
        for name, data_dir in dirs.items():
            data_dir.mkdir(parents=True, exist_ok=True)
            self.worker_dirs[name] = data_dir
            self.svc.start(name, WORKER, {"DPO_WORKER_NAME": name, "DPO_DATA_DIR": str(data_dir)})
        for name in dirs:
            self.svc.wait_for_worker(name, ("idle", "busy"), timeout_s=90)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory) -> str:
    from dpo_core.toy import build_model

    return build_model(tmp_path_factory.mktemp("mid-model") / "model", seed=0, **MID_SHAPE)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server, postgres_url, redis_env):
    from service.s3store import S3Storage
    from service.settings import Settings

    root = tmp_path_factory.mktemp("objstore")
    store_url = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}"
    env = {"DPO_DATABASE_URL": postgres_url, **redis_env, "DPO_STORAGE_URL": store_url,
           "DPO_S3_ENDPOINT_URL": s3_server.endpoint, "DPO_UPLOAD_MAX_BYTES_PER_S": str(UPLOAD_CAP),
           "DPO_WORKER_GPU_TYPE": "cpu", "DPO_WORKER_GPUS": "1"}
    store = S3Storage.from_settings(Settings(data_dir=root / "inspect", storage_url=store_url,
                                             s3_endpoint_url=s3_server.endpoint))
    cluster = Cluster(root, env, store)
    cluster.svc.start_api()
    try:
        cluster.svc.wait_ready()
        cluster.start_workers(w1=root / "w1" / "data", w2=root / "w2" / "data")
        yield cluster
    finally:
        cluster.svc.stop()


@pytest.fixture(scope="module")
def file_id(cluster, task_files) -> str:
    return cluster.svc.upload(task_files[0])


def submit(svc, model: str, file_id: str, **training) -> str:
    with svc.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": model, "training_file": file_id, "seed": 3, "training": {**FAST, **training},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 8}}}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def job_of(svc, job_id: str) -> dict:
    with svc.client() as c:
        return c.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def poll(what: str, check, svc, timeout_s: float = 120, every_s: float = 0.05):
    """check() until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s\n{svc.logs()}"
        time.sleep(every_s)
    return value


def listed_steps(svc, job_id: str) -> dict[int, str]:
    """The job's checkpoints (not the final model) that the API lists: step -> id."""
    with svc.client() as c:
        data = c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"]
    return {c["step_number"]: c["id"] for c in data if not c["final"]}


def stored_steps(store, job_id: str) -> list[int]:
    """The steps of the complete checkpoints in the store (manifest written)."""
    names = [key.rsplit("/", 1)[-1] for key in store.list_dirs(f"jobs/{job_id}")]
    return sorted(int(n.split("-")[1]) for n in names if n.startswith("checkpoint-"))


def uploads_in_progress(store, job_id: str) -> list[tuple[str, str]]:
    """(key, upload id) of the multipart uploads the store has open under the job's prefix."""
    prefix = f"{store.prefix}/jobs/{job_id}/"
    answer = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=prefix)
    return [(u["Key"][len(store.prefix) + 1:], u["UploadId"]) for u in answer.get("Uploads", [])]


def events(svc, job_id: str) -> list[dict]:
    with svc.client() as c:
        page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()
    assert not page["has_more"]
    return [e["data"] or {} for e in page["data"]]


def runs(svc, job_id: str) -> list[tuple[str, int | None]]:
    """Each run of the job: (its worker, the checkpoint step it resumed from, None from the start)."""
    log = events(svc, job_id)
    workers = [d["worker"] for d in log if d.get("status") == "running"]
    starts = [d["resumed_from_step"] for d in log if d.get("code") == "training_started"]
    return list(zip(workers, starts))


def download(svc, path: str) -> httpx.Response:
    """GET `path` with the API key; the API answers 307 to a presigned URL, fetched with no key at all."""
    with svc.client() as c:
        r = c.get(path)
    assert r.status_code == 307, (r.status_code, r.text)
    url = r.headers["location"]
    assert url.startswith(svc.env["DPO_S3_ENDPOINT_URL"]) and "X-Amz-Signature=" in url, url
    got = httpx.get(url, timeout=60)
    assert got.status_code == 200, got.text
    got.presigned_url = url
    return got


def losses(svc, job: dict) -> dict[int, float]:
    records = [json.loads(line) for line in download(svc, f"/v1/files/{job['result_files'][0]}/content").text
               .splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_worker_killed_mid_training_resumes_on_the_other_from_the_store_with_the_same_losses(
        cluster, file_id, tiny_model):
    svc, store = cluster.svc, cluster.store
    spec = dict(max_steps=40, save_steps=4, save_total_limit=None)
    job_id = submit(svc, tiny_model, file_id, **spec)
    straight_id = submit(svc, tiny_model, file_id, **spec)  # the same spec and seed, never interrupted
    cluster.jobs += [job_id, straight_id]
    job = poll("a checkpoint listed and the run past it", lambda: (j := job_of(svc, job_id)) and (
        j["status"] in TERMINAL or (listed_steps(svc, job_id) and (j["progress"]["step"] or 0) >= 10)) and j, svc)
    assert job["status"] == "running", job
    killed, other = job["worker"], ({"w1", "w2"} - {job["worker"]}).pop()
    svc.kill(killed)  # SIGKILL to the worker and its job process, mid-training
    time.sleep(1)  # the job process's upload process dies with it (PR_SET_PDEATHSIG)
    in_store = stored_steps(store, job_id)
    assert in_store and set(listed_steps(svc, job_id)) <= set(in_store)

    job = svc.wait_for_job(job_id, stall_s=STALL_S)
    assert job["status"] == "succeeded", f"{job['error']}\n{svc.logs()}"
    assert runs(svc, job_id) == [(killed, None), (other, in_store[-1])]
    straight = svc.wait_for_job(straight_id, stall_s=STALL_S)
    assert straight["status"] == "succeeded", straight["error"]
    a, b = losses(svc, job), losses(svc, straight)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    # Every checkpoint the API lists is whole in the store, under the id it is listed with.
    listed = listed_steps(svc, job_id)
    assert sorted(listed) == stored_steps(store, job_id) == list(range(4, 41, 4))
    for step, ckpt_id in listed.items():
        assert manifest(store, f"jobs/{job_id}/checkpoint-{step}")["arcname"] == ckpt_id
    # A worker in the dead one's place; its start clears the scratch the dead one left.
    cluster.start_workers(w3=cluster.worker_dirs[killed])


def manifest(store, key: str) -> dict:
    with store.open(f"{key}.json") as f:
        return json.loads(f.read())


def test_a_worker_killed_mid_upload_leaves_no_visible_checkpoint_and_the_other_resumes(
        cluster, file_id, mid_model):
    svc, store = cluster.svc, cluster.store
    job_id = submit(svc, mid_model, file_id, max_steps=6, save_steps=2, save_total_limit=None)
    cluster.jobs.append(job_id)
    cluster.mid_job = job_id

    def cut_here():  # checkpoint-2 whole and listed, checkpoint-4's tar being uploaded
        open_uploads = uploads_in_progress(store, job_id)
        tar = [u for u in open_uploads if u[0] == f"jobs/{job_id}/checkpoint-4.tar"]
        return tar if tar and 2 in listed_steps(svc, job_id) else None

    (upload,) = poll("checkpoint-4's upload in progress", cut_here, svc)
    killed = job_of(svc, job_id)["worker"]
    svc.kill(killed)
    time.sleep(1)  # the upload process dies with the job process
    live = [name for name in cluster.worker_dirs if name != killed and svc.procs[name].poll() is None]
    assert len(live) == 1, live
    assert upload in uploads_in_progress(store, job_id), "the upload ended before the kill"
    assert stored_steps(store, job_id) == [2] and not store.dir_exists(f"jobs/{job_id}/checkpoint-4")

    # Until another run has published it, the API never lists the cut checkpoint.
    started = lambda: len(runs(svc, job_id)) == 2 or listed_steps(svc, job_id).keys() != {2}  # noqa: E731
    poll("the job resumed", started, svc, every_s=0.1)
    assert runs(svc, job_id) == [(killed, None), (live[0], 2)]
    assert upload not in uploads_in_progress(store, job_id), "the cut upload was not aborted"
    job = svc.wait_for_job(job_id, stall_s=STALL_S)
    assert job["status"] == "succeeded", f"{job['error']}\n{svc.logs()}"
    assert sorted(losses(svc, job)) == list(range(1, 7))
    listed = listed_steps(svc, job_id)
    assert sorted(listed) == stored_steps(store, job_id) == [2, 4, 6]
    for step, ckpt_id in listed.items():
        assert manifest(store, f"jobs/{job_id}/checkpoint-{step}")["arcname"] == ckpt_id
    assert not uploads_in_progress(store, job_id)
    cluster.start_workers(w4=cluster.worker_dirs[killed])


def test_the_final_model_comes_through_a_presigned_url_and_loads(cluster, tmp_path, mid_model):
    import torch
    from transformers import AutoModelForCausalLM

    svc, job_id = cluster.svc, cluster.mid_job
    final = job_of(svc, job_id)["fine_tuned_model"]
    got = download(svc, f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{final}/content")
    body = got.content
    assert got.headers["content-length"] == str(len(body)) and f'{final}.tar' in got.headers.get(
        "content-disposition", "")
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(tmp_path, filter="data")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / final)
    base = AutoModelForCausalLM.from_pretrained(mid_model)
    assert model.config.hidden_size == MID_SHAPE["hidden_size"]
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in base.named_parameters()), "the model did not train"

    # Large downloads resume: the presigned URL answers a Range request with exactly those bytes.
    start, end = len(body) // 3, len(body) // 3 + 99_999
    part = httpx.get(got.presigned_url, headers={"Range": f"bytes={start}-{end}"}, timeout=60)
    assert part.status_code == 206 and part.headers["content-range"] == f"bytes {start}-{end}/{len(body)}"
    assert part.content == body[start:end + 1]


def test_nothing_of_a_job_stays_in_any_scratch_once_it_has_ended(cluster):
    svc = cluster.svc
    assert cluster.jobs and all(job_of(svc, j)["status"] == "succeeded" for j in cluster.jobs)
    live = [name for name in cluster.worker_dirs if svc.procs[name].poll() is None]
    for name in live:
        svc.wait_for_worker(name, "idle")
    for data_dir in {*cluster.worker_dirs.values(), svc.data_dir}:
        left = [str(p) for p in data_dir.rglob("*") if any(j in p.name for j in cluster.jobs)]
        assert left == [], f"{data_dir} still holds {left}"
    for data_dir in set(cluster.worker_dirs.values()):
        # Between jobs a scratch root holds its live worker's directory with the lock in it, and nothing
        # of the worker killed there: the one started in its place removed what it left.
        scratch = data_dir / "scratch"
        assert [p.relative_to(scratch).parts[1:] for p in scratch.rglob("*")] == [(), (".lock",)], \
            sorted(scratch.rglob("*"))
    assert not (svc.data_dir / "jobs").exists() and not (svc.data_dir / "files").exists()
