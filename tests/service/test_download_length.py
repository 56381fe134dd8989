"""Integration: a checkpoint download announces its exact length (Content-Length), short names or long
ones (PAX headers), so a client can show a percentage; the checkpoint object carries its files' size."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from service.artifacts import iter_tar, tar_entries, tar_size
from service.db import jobs
from tests.service.support import sessions_for, upload
from tests.service.test_symlinks import create

LONG = "a-rather-long-file-name-" * 8  # 184 characters: past ustar's 100, so tarfile writes a PAX header
TREES = {
    "short": {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 41, "sub/empty": b""},
    "long": {f"{LONG}.bin": b"x" * 513, f"{LONG[:120]}/{LONG}/w.bin": b"y" * 1024, "caf\u00e9.json": b"{}"},
}


def _make(directory, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)


@pytest.mark.parametrize("tree", sorted(TREES))
def test_tar_size_is_the_streamed_length(tmp_path, tree):
    src = tmp_path / "ckpt"
    _make(src, TREES[tree])
    entries = tar_entries(src)
    blob = b"".join(iter_tar(src, "ftckpt-1", entries))
    assert tar_size(src, "ftckpt-1", entries) == len(blob)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    for name, data in TREES[tree].items():
        assert (tmp_path / "out" / "ftckpt-1" / name).read_bytes() == data


@pytest.mark.parametrize("tree", sorted(TREES))
def test_download_sends_its_exact_length(client, settings, task_files, tree):
    train_id = upload(client, task_files[0])["id"]
    job_id = create(client, "owner/model", train_id).json()["id"]
    key = f"jobs/{job_id}/checkpoint-1"
    _make(settings.data_dir / key, TREES[tree])
    with sessions_for(settings).begin() as s:
        jobs.add_checkpoint(s, job_id, 1, key, None, size=sum(map(len, TREES[tree].values())))
    (ckpt,) = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert ckpt["bytes"] == sum(map(len, TREES[tree].values()))

    r = client.get(ckpt["download_url"])
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content) > ckpt["bytes"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert {m.name for m in tar.getmembers() if m.isfile()} == {f"{ckpt['id']}/{n}" for n in TREES[tree]}


def test_a_file_swapped_for_a_link_after_the_listing_breaks_the_stream(tmp_path):
    src = tmp_path / "ckpt"
    _make(src, {"a.bin": b"a", "b.bin": b"b"})
    entries = tar_entries(src)
    os.remove(src / "b.bin")
    (src / "b.bin").symlink_to("/etc/passwd")
    with pytest.raises(OSError):
        b"".join(iter_tar(src, "ftckpt-1", entries))
