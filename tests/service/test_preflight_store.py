"""Integration: the pre-flight report reads its inputs through the store, on the local store and on a
real S3 server: the uploads (fetched into a temporary directory that is gone afterwards) and, for a job
that continues a checkpoint, that checkpoint's model and tokenizer."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
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
    # The report of the model directory itself: what a fetch of the whole checkpoint would have read.
    whole = client.post("/v1/fine_tuning/jobs/preflight", json=body(str(model), file_id)).json()
    assert (r.json()["data"], r.json()["estimate"]) == (whole["data"], whole["estimate"])


def test_a_preflight_fetches_only_the_members_it_reads_of_a_checkpoint_on_s3(s3_server, tiny_model, tmp_path):
    from dpo_core import estimate
    from dpo_core.tokenizer_loading import load_tokenizer
    from service import parents
    from service.s3store import S3Storage
    from tests.s3server import s3_settings

    class Counted(S3Storage):  # the real store; only counts the bytes its ranged reads bring
        fetched = 0

        def read_range(self, key, start, end):
            Counted.fetched += end - start + 1
            return super().read_range(key, start, end)

        def fetch_dir(self, key, dest):
            raise AssertionError("pre-flight fetched the whole checkpoint")

    store = Counted.from_settings(s3_settings(s3_server, tmp_path / "data"))
    model = shutil.copytree(tiny_model, tmp_path / "final")
    (model / "optimizer.pt").write_bytes(b"\0" * 50_000)  # trainer state pre-flight never reads
    (model / "adapter").mkdir()  # a LoRA final model's adapter, read from the same tar
    (model / "adapter" / "adapter_config.json").write_text('{"r": 4}')
    shutil.copyfile(model / "model.safetensors", model / "adapter" / "adapter_model.safetensors")
    store.publish_dir(model, "jobs/j/final", "ftckpt-1")
    start = parents.Start("ftckpt-1", "j", "jobs/j/final", "jobs/j/final/adapter", {"r": 4}, ("ftckpt-1",),
                          model_key="jobs/j/final", adapter_key="jobs/j/final", adapter_subdir="adapter")

    fetched = parents.materialize_for_preflight(store, start, tmp_path / "parent")
    local, adapter = Path(fetched.model), Path(fetched.adapter)
    assert (adapter / "adapter_config.json").read_text() == '{"r": 4}'
    assert estimate._safetensors_shapes(adapter / "adapter_model.safetensors") == \
        estimate._safetensors_shapes(model / "model.safetensors")
    Counted.fetched = 0  # the model's share alone, below
    local = Path(parents.materialize_for_preflight(store, replace(start, adapter=None, adapter_key=None),
                                                   tmp_path / "again").model)
    weights = sum(p.stat().st_size for p in model.iterdir() if p.name.endswith(parents.WEIGHTS))
    small = sum(p.stat().st_size for p in model.rglob("*") if p.is_file() and not p.name.endswith(parents.WEIGHTS))
    assert Counted.fetched < small + 8 * 1024 < weights
    assert not (local / "optimizer.pt").exists()
    assert (local / "model.safetensors").stat().st_size < (model / "model.safetensors").stat().st_size
    assert estimate.model_facts(local) == estimate.model_facts(model)  # the same shapes, so the same estimate
    assert load_tokenizer(str(local)).get_vocab() == load_tokenizer(str(model)).get_vocab()
