"""Unit: the local artifact storage and the streamed tar of a checkpoint directory."""
from __future__ import annotations

import io
import tarfile

import pytest

from service.artifacts import LocalStorage, iter_tar


def test_put_open_exists_delete(tmp_path):
    storage = LocalStorage(tmp_path)
    assert storage.put_stream("files/a.jsonl", [b"hel", b"lo"]) == 5
    assert storage.exists("files/a.jsonl") and storage.open("files/a.jsonl").read() == b"hello"
    assert storage.path("files/a.jsonl") == tmp_path / "files" / "a.jsonl"
    assert storage.key_for(tmp_path / "files" / "a.jsonl") == "files/a.jsonl"
    storage.delete("files/a.jsonl")
    assert not storage.exists("files/a.jsonl")
    assert list((tmp_path / "files").iterdir()) == []  # no temporary file left behind


def test_put_stream_writes_chunks_as_they_come(tmp_path):
    storage = LocalStorage(tmp_path)
    seen = []

    def chunks():
        for i in range(3):
            # The earlier chunks are on disk already, under a temporary name only.
            seen.append(sorted(p.name for p in (tmp_path / "files").iterdir()))
            yield bytes([i]) * 1000

    assert storage.put_stream("files/a.jsonl", chunks()) == 3000
    assert storage.open("files/a.jsonl").read() == b"\0" * 1000 + b"\1" * 1000 + b"\2" * 1000
    assert all(len(names) == 1 and names[0].startswith(".a.jsonl.tmp-") for names in seen), seen
    assert [p.name for p in (tmp_path / "files").iterdir()] == ["a.jsonl"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("the source was refused")])
def test_put_stream_that_fails_midway_leaves_nothing(tmp_path, error):
    storage = LocalStorage(tmp_path)

    def chunks():
        yield b"x" * 5000
        raise error

    with pytest.raises(type(error)):
        storage.put_stream("files/a.jsonl", chunks())
    assert not storage.exists("files/a.jsonl")
    assert list((tmp_path / "files").iterdir()) == []


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../x", ""])
def test_keys_never_leave_the_root(tmp_path, key):
    with pytest.raises(ValueError):
        LocalStorage(tmp_path).path(key)


def test_delete_removes_directories(tmp_path):
    storage = LocalStorage(tmp_path)
    (tmp_path / "jobs" / "j" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "jobs" / "j" / "checkpoint-1" / "w.bin").write_bytes(b"x")
    storage.delete("jobs/j")
    assert not storage.exists("jobs/j")


def test_streamed_tar_extracts_to_the_same_files(tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": bytes(range(256)) * 5000, "sub/empty": b""}
    for name, data in files.items():
        (src / name).write_bytes(data)
    blob = b"".join(iter_tar(src, "ftckpt-1"))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "out", filter="data")
    assert names[0] == "ftckpt-1" and "ftckpt-1/sub/empty" in names
    for name, data in files.items():
        assert (tmp_path / "out" / "ftckpt-1" / name).read_bytes() == data
