"""Integration: symbolic links never lead a job or a download out of where they belong. A model whose
directory holds a link to a file outside the allowed model directories is refused at submission and,
when the link appears after submission, by the worker before it loads anything; links that stay
inside (a Hugging Face cache's snapshots -> blobs) are fine. A checkpoint never holds a link, and the
download of one (or of a job's result file) never follows a link planted in the job's directory."""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import threading
from pathlib import Path

import pytest

from dpo_core.checkpoint import atomic_dir
from dpo_core.errors import CheckpointError
from service.db import jobs
from service.db.models import File, new_id, now
from service.model_paths import model_problem
from tests.service.support import run_on_worker, sessions_for, upload

SECRET = Path("/etc/passwd")
FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
        "max_steps": 2, "save_steps": 1}


def secret_line() -> bytes:
    return SECRET.read_bytes().splitlines()[0]


def model_copy(tiny_model: str, where: Path) -> Path:
    """A copy of the tiny model inside the allowed model directories (pytest's temporary directory)."""
    return Path(shutil.copytree(tiny_model, where / "model"))


def link_chat_template(model: Path) -> None:
    """The tokenizer's chat template (read by AutoTokenizer, written into every checkpoint) -> /etc/passwd."""
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "chat_template.jinja").symlink_to(SECRET)


def create(client, model: str, train_id: str):
    return client.post("/v1/fine_tuning/jobs", json={
        "model": model, "training_file": train_id, "training": FAST,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})


def test_a_link_out_of_the_model_dirs_is_refused_and_links_inside_are_followed(tmp_path):
    allowed = [tmp_path / "models"]
    model = allowed[0] / "m"
    (model / "tok").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert model_problem(str(model), allowed) is None
    (model / "tok" / "chat_template.jinja").symlink_to(SECRET)
    problem = model_problem(str(model), allowed)
    assert problem and "tok/chat_template.jinja" in problem and str(SECRET) not in problem
    assert "tok/chat_template.jinja" in model_problem(str(model), allowed, must_exist=False)

    # A Hugging Face cache: snapshots/<rev>/ holds links to ../../blobs/<hash>, inside the allowed directory.
    cache = allowed[0] / "hub" / "models--o--m"
    (cache / "blobs").mkdir(parents=True)
    (cache / "blobs" / "abc").write_text("{}")
    snap = cache / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/abc")
    (snap / "loop").symlink_to(snap)  # a directory link back up: scanned once
    assert model_problem(str(snap), allowed) is None
    (cache / "blobs" / "tok.json").symlink_to(tmp_path / "elsewhere.json")  # out, one hop further
    (snap / "tokenizer.json").symlink_to("../../blobs/tok.json")
    assert "tokenizer.json" in model_problem(str(snap), allowed)
    (snap / "tokenizer.json").unlink()
    (snap / "cycle").symlink_to("cycle")  # a link to itself resolves nowhere: refused
    assert "cycle" in model_problem(str(snap), allowed)


def test_submission_refuses_a_model_with_a_link_to_etc_passwd(client, task_files, tiny_model, tmp_path):
    train_id = upload(client, task_files[0])["id"]
    model = model_copy(tiny_model, tmp_path)
    link_chat_template(model)
    r = create(client, str(model), train_id)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("model", "invalid_model")
    assert "chat_template.jinja" in error["message"]
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_the_worker_refuses_a_link_placed_after_submission(client, settings, task_files, tiny_model, tmp_path):
    train_id = upload(client, task_files[0])["id"]
    model = model_copy(tiny_model, tmp_path)
    r = create(client, str(model), train_id)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    link_chat_template(model)

    assert run_on_worker(settings, job_id) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["error"]["code"] == "model_not_allowed" and "chat_template.jinja" in job["error"]["message"]
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"] == []
    out = settings.data_dir / "jobs" / job_id
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in written if secret_line() in p.read_bytes()]


def test_a_checkpoint_write_that_leaves_a_link_fails_and_leaves_nothing(tmp_path):
    target = tmp_path / "checkpoint-1"

    def write(tmp: Path) -> None:  # what a hostile save hook of a model's own code could do
        (tmp / "config.json").write_text("{}")
        (tmp / "chat_template.jinja").symlink_to(SECRET)

    with pytest.raises(CheckpointError, match="chat_template.jinja"):
        atomic_dir(target, write)
    assert list(tmp_path.iterdir()) == [] and SECRET.is_file()

    atomic_dir(target, lambda tmp: (tmp / "sub").mkdir() or (tmp / "sub" / "w.bin").write_bytes(b"w"))
    assert (target / "sub" / "w.bin").read_bytes() == b"w"


def _job_with_checkpoint(client, settings, train_id) -> tuple[str, dict, Path]:
    job_id = create(client, "owner/model", train_id).json()["id"]
    key = f"jobs/{job_id}/checkpoint-1"
    directory = settings.data_dir / key
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "sub" / "weights.bin").write_bytes(b"w" * 1000)
    with sessions_for(settings).begin() as s:
        jobs.add_checkpoint(s, job_id, 1, key, None)
    (ckpt,) = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    return job_id, ckpt, directory


def _download(client, url: str, pipe: Path):
    """GET `url`; fails, instead of hanging, if the download blocks opening `pipe` (it is then unblocked)."""
    answer = {}
    getter = threading.Thread(target=lambda: answer.setdefault("r", client.get(url)), daemon=True)
    getter.start()
    getter.join(60)
    if getter.is_alive():
        with open(pipe, "wb"):  # a writer lets the blocked open return; the reader then sees EOF
            pass
        getter.join(60)
        pytest.fail("the download blocked opening a pipe in the checkpoint directory")
    return answer["r"]


def test_a_download_leaves_out_links_planted_in_a_checkpoint(client, settings, task_files, tmp_path):
    train_id = upload(client, task_files[0])["id"]
    job_id, ckpt, directory = _job_with_checkpoint(client, settings, train_id)
    (directory / "chat_template.jinja").symlink_to(SECRET)
    (directory / "sub" / "etc").symlink_to(SECRET.parent)  # a link to a directory
    os.mkfifo(directory / "pipe")  # would block a reader forever

    r = _download(client, ckpt["download_url"], directory / "pipe")
    assert r.status_code == 200
    assert secret_line() not in r.content
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    name = ckpt["id"]
    assert set(members) == {name, f"{name}/config.json", f"{name}/sub", f"{name}/sub/weights.bin"}
    assert all(m.isfile() or m.isdir() for m in members.values())

    # The checkpoint directory itself, or the job's directory, swapped for a link: not served at all.
    real = directory.with_name("real-checkpoint")
    directory.rename(real)
    directory.symlink_to(SECRET.parent)
    r = client.get(ckpt["download_url"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"
    assert secret_line() not in r.content
    directory.unlink()
    directory.symlink_to(directory.name)  # a link to itself
    r = client.get(ckpt["download_url"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"
    directory.unlink()
    job_dir = directory.parent
    job_dir.rename(tmp_path / "job-dir")
    job_dir.symlink_to(tmp_path / "job-dir")
    r = client.get(ckpt["download_url"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"


def test_a_result_file_swapped_for_a_link_is_not_served(client, settings, task_files):
    train_id = upload(client, task_files[0])["id"]
    job_id = create(client, "owner/model", train_id).json()["id"]
    key = f"jobs/{job_id}/metrics.jsonl"
    path = settings.data_dir / key
    path.parent.mkdir(parents=True)
    path.symlink_to(SECRET)
    file_id = new_id("file")
    with sessions_for(settings).begin() as s:
        s.add(File(id=file_id, team_id="team-default", filename="m.jsonl", purpose="fine-tune-results", bytes=1,
                   format="metrics", rows=1, status="processed", storage_key=key, created_at=now()))
    r = client.get(f"/v1/files/{file_id}/content")
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"
    assert secret_line() not in r.content
