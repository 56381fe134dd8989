"""S3Storage against a real S3 server (SeaweedFS, tests/s3server.py): what only an object store does:
a directory exists once its manifest does, presigned URLs, multipart uploads, the bucket, the errors.
(What both stores do alike is in test_storage.py.)"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import tarfile
import time
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config

from service import s3store
from service.artifacts import make_storage
from service.s3store import S3Storage
from service.settings import Settings
from tests.s3server import S3Server, s3_settings, s3_storage

BIG = 20 << 20  # past the 16 MiB multipart threshold: two parts


@pytest.fixture
def store(s3_server, tmp_path) -> S3Storage:
    return s3_storage(s3_server, tmp_path / "data")


def _full(store: S3Storage, key: str) -> str:
    return f"{store.prefix}/{key}"


def _uploads(store: S3Storage) -> list[str]:
    """The multipart uploads in progress under the store's prefix."""
    found = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix + "/")
    return [u["Key"] for u in found.get("Uploads", [])]


def _directory(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_a_directory_exists_only_once_its_manifest_does(store, tmp_path):
    src = _directory(tmp_path / "ckpt", {"config.json": b"{}", "w.bin": os.urandom(10_000)})
    store.publish_dir(src, "jobs/j/checkpoint-1", "ftckpt-1")
    store.put_stream("jobs/j/metrics.jsonl", [b"{}\n"])
    # A publish killed after its tar and before its manifest, and one killed mid-upload.
    store.client.put_object(Bucket=store.bucket, Key=_full(store, "jobs/j/checkpoint-2.tar"), Body=b"\0" * 1024)
    upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=_full(store, "jobs/j/checkpoint-3.tar"))
    store.client.upload_part(Bucket=store.bucket, Key=_full(store, "jobs/j/checkpoint-3.tar"), PartNumber=1,
                             UploadId=upload["UploadId"], Body=b"x" * (5 << 20))
    assert _uploads(store) == [_full(store, "jobs/j/checkpoint-3.tar")]
    assert not store.dir_exists("jobs/j/checkpoint-2") and store.list_dirs("jobs/j") == ["jobs/j/checkpoint-1"]
    for call in (lambda: store.dir_tar("jobs/j/checkpoint-2", "x"),
                 lambda: store.fetch_dir("jobs/j/checkpoint-2", tmp_path / "out")):
        with pytest.raises(FileNotFoundError):
            call()
    store.remove_partial("jobs/j")
    assert _uploads(store) == []
    assert sorted(o.key for o in store.list("jobs/j")) == [
        "jobs/j/checkpoint-1.json", "jobs/j/checkpoint-1.tar", "jobs/j/metrics.jsonl"]
    assert store.dir_exists("jobs/j/checkpoint-1")


def test_a_publish_that_fails_leaves_no_directory(store, tmp_path, monkeypatch):
    src = _directory(tmp_path / "ckpt", {"a": b"1"})
    store.publish_dir(src, "jobs/j/final", "x")

    def failing_tar(*args, **kwargs):
        yield b"\0" * BIG  # into the multipart upload
        raise OSError(errno.EIO, "the disk went away")

    monkeypatch.setattr(s3store, "iter_tar", failing_tar)
    with pytest.raises(OSError, match="the disk went away"):
        store.publish_dir(src, "jobs/j/final", "x")
    # The earlier directory stopped existing before the new tar was sent; nothing of the new one remains.
    assert not store.dir_exists("jobs/j/final") and store.list_dirs("jobs/j") == [] and _uploads(store) == []


def test_a_stored_tar_that_does_not_match_its_manifest_is_refused(store, tmp_path):
    src = _directory(tmp_path / "ckpt", {"a": b"1" * 3000})
    store.publish_dir(src, "jobs/j/final", "x")
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w") as tar:
        info = tarfile.TarInfo("x/a")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"0" * 10))
    store.client.put_object(Bucket=store.bucket, Key=_full(store, "jobs/j/final.tar"), Body=other.getvalue())
    with pytest.raises(OSError, match="does not hold what its manifest lists"):
        store.fetch_dir("jobs/j/final", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_presigned_urls_serve_ranges_and_expire(s3_server, store, tmp_path):
    data = os.urandom(100_000)
    store.put_stream("files/f.jsonl", [data])
    url = store.presign("files/f.jsonl", 60, "train data.jsonl")
    whole = httpx.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert "train%20data.jsonl" in whole.headers["content-disposition"]
    part = httpx.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["content-range"] == "bytes 1000-1999/100000"
    signature = url.split("X-Amz-Signature=")[1][:64]
    forged = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert httpx.get(forged).status_code == 403
    short = store.presign("files/f.jsonl", 1, "f.jsonl")
    time.sleep(2.5)
    assert httpx.get(short).status_code == 403

    src = _directory(tmp_path / "ckpt", {"config.json": b"{}", "w.bin": os.urandom(50_000)})
    store.publish_dir(src, "jobs/j/checkpoint-1", "ftckpt-1")
    download = store.dir_tar("jobs/j/checkpoint-1", "ftckpt-1")
    tar_url = store.presign_dir("jobs/j/checkpoint-1", 60, "ftckpt-1.tar")
    assert httpx.get(tar_url).content == b"".join(download.read(0, download.size - 1))
    ranged = httpx.get(tar_url, headers={"Range": f"bytes=512-{download.size - 1}"})
    assert ranged.status_code == 206 and ranged.content == b"".join(download.read(512, download.size - 1))


def test_presigned_urls_name_the_public_endpoint(s3_server, tmp_path):
    public = s3_server.endpoint.replace("127.0.0.1", "localhost")
    store = s3_storage(s3_server, tmp_path, s3_public_endpoint_url=public)
    store.put_stream("files/f.jsonl", [b"abc"])
    url = store.presign("files/f.jsonl", 60, "f.jsonl")
    assert url.startswith(public + "/" + s3_server.bucket + "/")  # path-style, as the server is addressed
    assert httpx.get(url).content == b"abc"


def test_a_big_file_goes_in_parts_and_comes_back_whole(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(BIG))
    parts = []
    store.client.meta.events.register("before-call.s3.UploadPart", lambda **kw: parts.append(kw["params"]))
    assert store.put_file("jobs/j/big.bin", src) == BIG
    assert len(parts) == 2  # a multipart upload: 16 MiB, then the rest
    got = store.fetch_file("jobs/j/big.bin", tmp_path / "scratch" / "big.bin")
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    boundary = s3store.PART_SIZE
    with src.open("rb") as f:
        f.seek(boundary - 10)
        assert b"".join(store.read_range("jobs/j/big.bin", boundary - 10, boundary + 9)) == f.read(20)


def test_a_put_stream_that_fails_mid_multipart_leaves_nothing(store):
    def chunks():
        for _ in range(BIG >> 20):
            yield b"x" * (1 << 20)
        raise ValueError("the upload was refused")

    started = []
    store.client.meta.events.register("before-call.s3.CreateMultipartUpload", lambda **kw: started.append(1))
    with pytest.raises(ValueError, match="refused"):
        store.put_stream("files/a.jsonl", chunks())
    assert started  # it failed inside a multipart upload, which was aborted:
    assert not store.exists("files/a.jsonl") and list(store.list("")) == [] and _uploads(store) == []


def test_uploads_keep_to_the_bandwidth_cap(s3_server, tmp_path):
    store = s3_storage(s3_server, tmp_path, upload_max_bytes_per_s=512 << 10)
    began = time.monotonic()
    store.put_stream("files/a.bin", [b"x" * (1 << 20)])
    assert time.monotonic() - began >= 1.0  # 2 s at the cap, less the limiter's first burst
    assert store.size("files/a.bin") == 1 << 20


def test_the_bucket_is_made_on_first_use(s3_server, tmp_path):
    bucket = f"dpo-new-{uuid.uuid4().hex[:12]}"
    settings = Settings(data_dir=tmp_path, storage_url=f"s3://{bucket}", s3_endpoint_url=s3_server.endpoint)
    store = make_storage(settings)
    assert isinstance(store, S3Storage) and store.prefix == ""
    store.put_stream("files/a.jsonl", [b"a"])
    assert [o.key for o in store.list("")] == ["files/a.jsonl"]
    store.delete("files/a.jsonl")
    store.client.delete_bucket(Bucket=bucket)


def test_credentials_that_may_not_make_the_bucket_get_a_clear_error(s3_server, tmp_path, monkeypatch):
    if s3_server.limited is None:
        pytest.skip("this S3 server has no identity that may not create buckets")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.limited[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.limited[1])
    settings = Settings(data_dir=tmp_path, storage_url=f"s3://dpo-refused-{uuid.uuid4().hex[:12]}/p",
                        s3_endpoint_url=s3_server.endpoint)
    with pytest.raises(OSError, match="does not exist and could not be created") as err:
        make_storage(settings).put_stream("files/a.jsonl", [b"a"])
    assert err.value.errno == errno.EIO


def test_wrong_credentials_and_a_silent_endpoint_are_os_errors(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(OSError) as err:
        s3_storage(s3_server, tmp_path).exists("files/a.jsonl")
    assert err.value.errno == errno.EIO and not isinstance(err.value, FileNotFoundError)
    assert "refused these credentials" in str(err.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = boto3.client("s3", endpoint_url=closed, region_name="us-east-1", aws_access_key_id="k",
                          aws_secret_access_key="s", config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(OSError) as err:
        S3Storage(client, "bucket", "p").put_stream("files/a.jsonl", [b"a"])
    assert err.value.errno == errno.EIO and closed in str(err.value)


def test_settings_pick_the_bucket_prefix_endpoints_and_region(tmp_path, monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    settings = Settings(data_dir=tmp_path, storage_url="s3://bucket/a/b/", s3_endpoint_url="http://store:8333",
                        s3_public_endpoint_url="https://files.example.org", upload_max_bytes_per_s=1000)
    store = S3Storage.from_settings(settings)
    assert (store.bucket, store.prefix, store.region, store.max_bytes_per_s) == ("bucket", "a/b", "us-east-1", 1000)
    assert store.client.meta.endpoint_url == "http://store:8333"
    assert store.client.meta.config.s3["addressing_style"] == "path"
    assert store.presign_client.meta.endpoint_url == "https://files.example.org"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    aws = S3Storage.from_settings(Settings(data_dir=tmp_path, storage_url="s3://bucket"))
    assert (aws.prefix, aws.region, aws.client.meta.region_name) == ("", "eu-west-3", "eu-west-3")
    assert aws.client.meta.config.s3["addressing_style"] == "auto" and aws.presign_client is aws.client
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3Storage.from_settings(Settings(data_dir=tmp_path, storage_url="s3:///prefix"))


def test_s3_settings_give_each_test_its_own_prefix(s3_server: S3Server, tmp_path):
    first, second = s3_settings(s3_server, tmp_path), s3_settings(s3_server, tmp_path)
    assert first.store_url != second.store_url and first.store_url.startswith(f"s3://{s3_server.bucket}/")
