"""Unit: the two stores (LocalStorage; S3Storage against a real S3 server) and the streamed tar of a
checkpoint directory."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from service import artifacts
from service.artifacts import LocalStorage, iter_tar
from tests.s3server import s3_storage


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


def _checkpoint(path: Path, big: int = 3000) -> dict[str, bytes]:
    """A small directory like a checkpoint, with a nested file and an empty one."""
    files = {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(256)) * big,
             "sub/empty": b"", "sub/deeper/x.txt": b"x" * 777}
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return files


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- The Storage interface: what both stores do alike (a real S3 server for "s3"; tests/s3server.py). ---

@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return s3_storage(request.getfixturevalue("s3_server"), tmp_path / "data")


@pytest.fixture
def local(tmp_path):
    return LocalStorage(tmp_path / "store")


def test_objects_round_trip(store):
    assert store.put_stream("files/a.jsonl", [b"hel", b"lo"]) == 5
    assert store.exists("files/a.jsonl") and store.size("files/a.jsonl") == 5
    with store.open("files/a.jsonl") as handle:
        assert handle.read() == b"hello"
    assert b"".join(store.read_range("files/a.jsonl", 1, 3)) == b"ell"
    store.delete("files/a.jsonl")
    assert not store.exists("files/a.jsonl")
    store.delete("files/a.jsonl")  # deleting what is gone is no error
    for call in (lambda: store.open("files/a.jsonl"), lambda: store.read_range("files/a.jsonl", 0, 1),
                 lambda: store.size("files/a.jsonl")):
        with pytest.raises(FileNotFoundError):
            call()


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../x", ""])
def test_no_store_takes_a_key_that_climbs(store, key):
    for call in (lambda: store.exists(key), lambda: store.put_stream(key, [b"x"]), lambda: store.dir_exists(key)):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("the source was refused")])
def test_a_failed_put_stream_leaves_no_object(store, error):
    def chunks():
        yield b"x" * 5000
        raise error

    with pytest.raises(type(error)):
        store.put_stream("files/a.jsonl", chunks())
    assert not store.exists("files/a.jsonl") and list(store.list("files")) == []


def test_put_file_copies_and_reads_back_in_ranges(store, tmp_path):
    src = tmp_path / "metrics.jsonl"
    src.write_bytes(bytes(range(256)) * 10)
    assert store.put_file("jobs/j/metrics.jsonl", src) == 2560
    with src.open("ab") as f:
        f.write(b"later")  # the source grows; the stored copy does not
    assert store.size("jobs/j/metrics.jsonl") == 2560
    assert b"".join(store.read_range("jobs/j/metrics.jsonl", 0, 2559)) == bytes(range(256)) * 10
    assert b"".join(store.read_range("jobs/j/metrics.jsonl", 250, 260)) == (bytes(range(256)) * 2)[250:261]
    with pytest.raises(FileNotFoundError):
        store.read_range("jobs/j/missing", 0, 1)


def test_fetch_file(store, tmp_path):
    store.put_stream("files/f.jsonl", [b"abc"])
    dest = tmp_path / "scratch" / "data" / "f.jsonl"
    got = store.fetch_file("files/f.jsonl", dest)
    assert got.read_bytes() == b"abc"
    if store.remote:
        assert got == dest
    else:  # the store's own file, no copy
        assert got == store.path("files/f.jsonl") and not dest.parent.exists()
    with pytest.raises(FileNotFoundError):
        store.fetch_file("files/none.jsonl", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_list_yields_objects_under_the_prefix_only(store, tmp_path):
    store.put_stream("jobs/a/metrics.jsonl", [b"12345"])
    store.put_stream("jobs/ab/metrics.jsonl", [b"1"])
    src = tmp_path / "ckpt"
    _checkpoint(src, big=1)
    store.publish_dir(src, "jobs/a/checkpoint-1", "ftckpt-1")
    listed = {o.key: o.size for o in store.list("jobs/a")}
    assert listed["jobs/a/metrics.jsonl"] == 5 and "jobs/ab/metrics.jsonl" not in listed
    assert any(key.startswith("jobs/a/checkpoint-1") for key in listed)  # its files, or its tar and manifest
    assert {o.key for o in store.list("jobs/a/")} == set(listed)
    assert len(list(store.list(""))) == len(listed) + 1
    assert list(store.list("jobs/none")) == []
    assert all(o.modified > 1e9 for o in store.list(""))


def test_publish_fetch_and_list_dirs(store, tmp_path):
    src = tmp_path / "ckpt"
    files = _checkpoint(src)
    (src / "link").symlink_to("/etc/passwd")  # never published
    assert store.publish_dir(src, "jobs/j/checkpoint-10", "ftckpt-1") == sum(map(len, files.values()))
    store.put_stream("jobs/j/tracking.json", [b"{}"])
    assert store.dir_exists("jobs/j/checkpoint-10") and not store.dir_exists("jobs/j/checkpoint-20")
    assert not store.dir_exists("jobs/j/tracking.json") and not store.dir_exists("jobs/j/tracking")
    assert store.exists("jobs/j/checkpoint-10") and store.size("jobs/j/checkpoint-10") == sum(map(len, files.values()))
    assert store.list_dirs("jobs/j") == ["jobs/j/checkpoint-10"] and store.list_dirs("jobs/none") == []
    dest = store.fetch_dir("jobs/j/checkpoint-10", tmp_path / "scratch" / "output" / "checkpoint-10")
    assert dest == tmp_path / "scratch" / "output" / "checkpoint-10" and _tree(dest) == files
    assert not (dest / "link").exists() and not (dest / "link").is_symlink()
    with pytest.raises(FileNotFoundError):
        store.fetch_dir("jobs/j/checkpoint-20", tmp_path / "other")
    assert not (tmp_path / "other").exists()
    store.delete("jobs/j/checkpoint-10")
    assert not store.dir_exists("jobs/j/checkpoint-10") and store.list_dirs("jobs/j") == []
    assert not store.exists("jobs/j/checkpoint-10")
    with pytest.raises(FileNotFoundError):
        store.size("jobs/j/checkpoint-10")
    store.delete("jobs/j/tracking")  # no directory: its name's .json is another object, left alone
    assert [o.key for o in store.list("jobs/j")] == ["jobs/j/tracking.json"]


def test_publish_replaces_an_earlier_directory(store, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a").write_bytes(b"1")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "b").write_bytes(b"22")
    store.publish_dir(tmp_path / "one", "jobs/j/final", "x")
    store.publish_dir(tmp_path / "two", "jobs/j/final", "x")
    assert _tree(store.fetch_dir("jobs/j/final", tmp_path / "got")) == {"b": b"22"}
    assert store.list_dirs("jobs/j") == ["jobs/j/final"]
    store.remove_partial("jobs/j")  # nothing partial: nothing goes
    assert store.dir_exists("jobs/j/final")
    assert all(o.key.startswith("jobs/j/final") for o in store.list("jobs/j"))  # nothing left aside


def test_dir_tar_whole_and_in_ranges(store, tmp_path):
    src = tmp_path / "ckpt"
    files = _checkpoint(src)
    store.publish_dir(src, "jobs/j/checkpoint-10", "ftckpt-7")
    download = store.dir_tar("jobs/j/checkpoint-10", "ftckpt-7")
    whole = b"".join(download.read(0, download.size - 1))
    assert len(whole) == download.size
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    assert _tree(tmp_path / "out" / "ftckpt-7") == files
    cuts = [0, 1, 511, 512, 513, 1024, 2000, 100_000, download.size - 1025, download.size - 1]
    for start in cuts:
        for end in (start, start + 1, start + 4096, download.size - 1):
            end = min(end, download.size - 1)
            assert b"".join(download.read(start, end)) == whole[start:end + 1], (start, end)
    with pytest.raises(FileNotFoundError):
        store.dir_tar("jobs/j/checkpoint-20", "x")


def test_fetch_dir_refuses_an_existing_destination(store, tmp_path):
    src = tmp_path / "ckpt"
    _checkpoint(src, big=1)
    store.publish_dir(src, "jobs/j/checkpoint-1", "x")
    (tmp_path / "dest").mkdir()
    with pytest.raises(FileExistsError):
        store.fetch_dir("jobs/j/checkpoint-1", tmp_path / "dest")


@pytest.mark.parametrize("key", ["files/none.jsonl", "jobs/j", "jobs/j/checkpoint-1"])
def test_both_stores_refuse_the_size_of_a_missing_key(store, key):
    store.put_stream("jobs/other/metrics.jsonl", [b"x"])  # a neighbour's bytes count for no missing key
    with pytest.raises(FileNotFoundError):
        store.size(key)
    store.put_stream(f"{key}/part", [b"abc"])  # anything under the key: a directory of it
    assert store.size(key) == 3


def test_an_empty_store_has_nothing(store):
    assert not store.dir_exists("jobs/j") and store.list_dirs("jobs") == [] and list(store.list("")) == []
    assert not store.exists("jobs/j")
    store.remove_partial("jobs/j")
    assert store.presign_dir("jobs/j/final", 60, "x.tar") is None or store.remote


# --- LocalStorage only ---

def test_a_ranged_tar_reads_nothing_it_skips(local, tmp_path, monkeypatch):
    src = tmp_path / "ckpt"
    _checkpoint(src, big=4000)  # model.safetensors: ~1 MB
    local.publish_dir(src, "jobs/j/checkpoint-10", "ftckpt-7")
    download = local.dir_tar("jobs/j/checkpoint-10", "ftckpt-7")
    whole = b"".join(download.read(0, download.size - 1))
    opened, asked = [], []
    real_open, real_exactly = artifacts._open_below, artifacts._exactly
    monkeypatch.setattr(artifacts, "_open_below", lambda root, parts: opened.append(parts) or real_open(root, parts))
    monkeypatch.setattr(artifacts, "_exactly", lambda handle, size: asked.append(size) or real_exactly(handle, size))
    offset = whole.index(bytes(range(256)) * 4) + 500_000  # inside the big file
    assert b"".join(download.read(offset, offset + 99)) == whole[offset:offset + 100]
    assert opened == [("model.safetensors",)] and asked == [100]


def test_symbolic_links_are_never_followed(local, tmp_path):
    outside = tmp_path / "outside"
    _checkpoint(outside, big=1)
    local.root.mkdir(parents=True)
    (local.root / "jobs").mkdir()
    (local.root / "jobs" / "j").symlink_to(outside)
    (local.root / "all").symlink_to(local.root / "jobs")
    (local.root / "files").mkdir()
    (local.root / "files" / "f.jsonl").symlink_to(outside / "config.json")
    assert not local.dir_exists("jobs/j") and local.list_dirs("jobs") == []
    assert list(local.list("")) == [] and list(local.list("jobs/j")) == [] and local.list_dirs("all") == []
    assert list(local.list("all/j")) == [] and not local.dir_exists("all/j")
    for call in (lambda: local.dir_tar("jobs/j", "x"), lambda: local.fetch_dir("jobs/j", tmp_path / "d"),
                 lambda: local.fetch_file("files/f.jsonl", tmp_path / "f"),
                 lambda: local.read_range("files/f.jsonl", 0, 1)):
        with pytest.raises(FileNotFoundError):
            call()
    local.delete("jobs/j")  # the link goes, not what it points to
    assert (outside / "config.json").exists()


def test_publish_links_files_and_appears_whole(local, tmp_path, monkeypatch):
    src = tmp_path / "ckpt"
    _checkpoint(src, big=1)
    local.publish_dir(src, "jobs/j/checkpoint-1", "x")
    assert local.path("jobs/j/checkpoint-1/config.json").stat().st_ino == (src / "config.json").stat().st_ino
    calls = []

    def failing(root, parts, target):
        calls.append(parts)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(root, parts, target)

    real = artifacts._link_file
    monkeypatch.setattr(artifacts, "_link_file", failing)
    with pytest.raises(OSError):
        local.publish_dir(src, "jobs/j/checkpoint-2", "x")
    assert [p.name for p in local.path("jobs/j").iterdir()] == ["checkpoint-1"]


def test_publish_copies_across_filesystems(local, tmp_path, monkeypatch):
    src = tmp_path / "ckpt"
    files = _checkpoint(src, big=1)

    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(artifacts.os, "link", no_links)
    local.publish_dir(src, "jobs/j/checkpoint-1", "x")
    assert _tree(local.path("jobs/j/checkpoint-1")) == files
    assert local.path("jobs/j/checkpoint-1/config.json").stat().st_ino != (src / "config.json").stat().st_ino


def test_remove_partial_removes_only_what_interrupted_writes_left(local, tmp_path):
    src = tmp_path / "ckpt"
    _checkpoint(src, big=1)
    local.publish_dir(src, "jobs/j/checkpoint-1", "x")
    local.put_stream("jobs/j/metrics.jsonl", [b"m"])
    job = local.path("jobs/j")
    (job / ".checkpoint-2.tmp-123-456").mkdir()
    (job / ".checkpoint-2.tmp-123-456" / "w").write_bytes(b"w")
    (job / ".final.old-1-2").mkdir()
    (job / ".metrics.jsonl.tmp-9-9").write_bytes(b"half")
    (job / ".hidden-but-ours").write_bytes(b"kept")
    assert local.list_dirs("jobs/j") == ["jobs/j/checkpoint-1"]
    local.remove_partial("jobs/j")
    assert sorted(p.name for p in job.iterdir()) == [".hidden-but-ours", "checkpoint-1", "metrics.jsonl"]
    local.remove_partial("jobs/none")  # nothing there: nothing to do


def test_the_manifest_locates_each_file_in_the_tar(tmp_path):
    src = tmp_path / "ckpt"
    files = _checkpoint(src)
    entries = artifacts.tar_entries(src)
    manifest = artifacts.tar_manifest(src, "ftckpt-1", entries)
    blob = b"".join(iter_tar(src, "ftckpt-1", entries))
    assert manifest["size"] == len(blob) == artifacts.tar_size(src, "ftckpt-1", entries)
    assert {f["name"] for f in manifest["files"]} == set(files)
    for f in manifest["files"]:
        assert blob[f["offset"]:f["offset"] + f["size"]] == files[f["name"]]
