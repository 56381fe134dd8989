"""Integration: the pre-flight report reads its inputs through the store, on the local store and on a
real S3 server: the uploads (fetched into a temporary directory that is gone afterwards) and, for a job
that continues a checkpoint, that checkpoint's model and tokenizer."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from service.artifacts import make_storage
from service.db import jobs
from tests.service.support import sessions_for, store_settings, upload
from tests.service.test_api_preflight import body
from tests.service.test_symlinks import create


@pytest.fixture(params=["local", "s3"])
def settings(request, tmp_path):
    return store_settings(request, tmp_path / "data")


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """Where the process makes its temporary directories during the test."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def test_a_preflight_reads_the_uploads_through_the_store(client, task_files, tiny_model, scratch):
    file_id = upload(client, task_files[0])["id"]
    r = client.post("/v1/fine_tuning/jobs/preflight", json=body(tiny_model, file_id))
    assert r.status_code == 200, r.text
    rows = task_files[0].read_text().count("\n")
    assert r.json()["data"]["training_file"]["rows"] == rows
    assert list(scratch.iterdir()) == []  # the downloaded copies are gone


def test_a_preflight_of_a_job_that_continues_a_checkpoint_reads_it_from_the_store(
        client, settings, task_files, tiny_model, scratch, tmp_path):
    file_id = upload(client, task_files[0])["id"]
    parent = create(client, "owner/model", file_id).json()["id"]
    key = f"jobs/{parent}/final"
    model = shutil.copytree(tiny_model, tmp_path / "final")
    with sessions_for(settings).begin() as s:
        ckpt = jobs.add_checkpoint(s, parent, 1, key, None, final=True).id
        jobs.update_job(s, parent, fine_tuned_model=ckpt, status="succeeded")
    make_storage(settings).publish_dir(model, key, ckpt)

    r = client.post("/v1/fine_tuning/jobs/preflight", json=body(parent, file_id))
    assert r.status_code == 200, r.text
    assert r.json()["data"]["training_file"]["rows_used"] > 0
    assert r.json()["estimate"]["memory"]["total"] > 0
    assert list(scratch.iterdir()) == []
