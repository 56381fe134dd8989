"""Artifacts in an S3-compatible object store (AWS S3, SeaweedFS, MinIO): the Storage interface on boto3.

An object is an object under the store's prefix. A published directory `K` is one tar object `K.tar`
(members under `arcname/`, streamed from the local files by a multipart upload, never held whole in memory)
and a manifest `K.json` written after it: the directory exists only once its manifest does, so a writer
killed mid-upload leaves no directory anyone could take for whole (remove_partial clears what it left).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import tarfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.artifacts import (CHUNK, StoredObject, TarDownload, appear_whole, iter_file, iter_tar, key_parts,
                               tar_entries, tar_manifest, temporary_sibling)

log = logging.getLogger("dpo.storage")

PART_SIZE = 16 << 20  # multipart threshold and part size: memory held per part in flight
MAX_PARTS = 9000  # S3 allows 10,000 parts; a larger tar gets larger parts
_MISSING = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
_PRESIGNED = {"GET": "get_object", "HEAD": "head_object"}  # the S3 operation a presigned URL serves


class S3Storage:
    """Artifacts under s3://bucket/prefix. Errors: FileNotFoundError for a missing key, OSError (EIO) with
    the operation, the address and the store's own error code for anything else the store refuses."""

    remote = True  # uploads go in the background, inputs are downloaded before a run

    def __init__(self, client, bucket: str, prefix: str = "", presign_client=None,
                 max_bytes_per_s: int | None = None, region: str = "us-east-1", part_size: int = PART_SIZE):
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.presign_client = presign_client or client
        self.region, self.part_size, self.max_bytes_per_s = region, part_size, max_bytes_per_s
        self._bucket_checked = False
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> S3Storage:
        """The store settings.store_url names (s3://bucket or s3://bucket/prefix). Credentials and region
        come from boto3's standard chain (environment, profiles, SSO, IRSA, instance metadata); a custom
        endpoint (SeaweedFS, MinIO) is addressed path-style, since such servers rarely have bucket DNS names."""
        url = urlsplit(settings.store_url)
        if url.scheme != "s3" or not url.netloc:
            raise ValueError(f"DPO_STORAGE_URL must look like s3://bucket/prefix, not {settings.store_url!r}")
        session = boto3.session.Session()
        region = session.region_name or os.environ.get("AWS_REGION") or "us-east-1"

        def client(endpoint: str | None):
            config = Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 5},
                            connect_timeout=10, read_timeout=60, max_pool_connections=16,
                            s3={"addressing_style": "path" if endpoint else "auto"})
            return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)

        main = client(settings.s3_endpoint_url)
        public = settings.s3_public_endpoint_url
        return cls(main, url.netloc, url.path, client(public) if public else main,
                   max_bytes_per_s=settings.upload_max_bytes_per_s, region=region)

    # --- objects ---

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Upload the chunks as they come (a few parts in memory, never the whole stream); the object
        appears only when they ran out. An error meanwhile, the iterable's own included (raised as it
        was), aborts the multipart upload: nothing appears."""
        reader = _ChunkReader(chunks)
        self._upload(reader, key, self._upload_config(self.part_size))
        return reader.count

    def put_file(self, key: str, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        return self.put_stream(key, iter_file(os.fdopen(fd, "rb")))

    def open(self, key: str) -> BinaryIO:
        body = self._get(key)
        return io.BufferedReader(_BodyReader(body, self._where(key)), CHUNK)

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes `start` to `end` (inclusive); the request is made before the first chunk is asked for,
        so a missing key fails the call itself."""
        body = self._get(key, f"bytes={start}-{end}")
        return _chunks(body, self._where(key), end - start + 1)

    def fetch_file(self, key: str, dest: Path) -> Path:
        """Download to `dest` (parents made), appearing whole: a temporary sibling, then a rename."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(dest)
        try:
            with self._errors("download", self._full(key)):
                self.client.download_file(self.bucket, self._full(key), str(tmp), Config=self._download_config())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    def presign(self, key: str, ttl_s: int, filename: str, method: str = "GET") -> str | None:
        return self._presign(self._full(key), ttl_s, filename, method)

    def exists(self, key: str) -> bool:
        """An object, a published directory, or anything under `key/` (as a local directory would be)."""
        full = self._full(key)
        return self._head(full) is not None or self.dir_exists(key) or self._any_under(full + "/")

    def delete(self, key: str) -> None:
        """Remove the object at `key`, the directory published there (its manifest first, so it stops
        existing before its tar goes) and every object under `key/`."""
        full = self._full(key)
        if self.dir_exists(key):  # a .json that is no manifest (tracking.json) is some other key's object
            self._delete_keys([f"{full}.json"])
            self._delete_keys([f"{full}.tar"])
        self._delete_keys([full, *(o["Key"] for o in self._objects(full + "/"))])

    def size(self, key: str) -> int:
        """Bytes of the object, else of the files in the directory published at `key`, else of the objects
        under `key/`, as LocalStorage counts a file or a directory; FileNotFoundError when none is there."""
        full = self._full(key)
        head = self._head(full)
        if head is not None:
            return head["ContentLength"]
        try:
            return sum(f["size"] for f in self._manifest(key)["files"])
        except FileNotFoundError:
            sizes = [o["Size"] for o in self._objects(full + "/")]
        if not sizes:
            raise FileNotFoundError(errno.ENOENT, "not in the object store", self._where(key))
        return sum(sizes)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object under `prefix` ("" for all): published directories show as their .tar and .json."""
        for obj in self._objects(self._full_prefix(prefix)):
            yield StoredObject(self._relative(obj["Key"]), obj["Size"], obj["LastModified"].timestamp())

    # --- published directories ---

    def publish_dir(self, local_dir: Path, key: str, arcname: str) -> int:
        """Stream `local_dir` as `<key>.tar` (members under `arcname/`; links left out), then write the
        manifest `<key>.json`. A directory already published there stops existing first (its manifest goes)
        so that no manifest ever describes another tar. Returns the files' bytes."""
        local_dir = Path(local_dir)
        entries = tar_entries(local_dir)
        manifest = tar_manifest(local_dir, arcname, entries)
        full = self._full(key)
        self._delete_keys([f"{full}.json"])
        reader = _ChunkReader(iter_tar(local_dir, arcname, entries))
        self._upload(reader, f"{key}.tar", self._upload_config(max(self.part_size, _part_for(manifest["size"]))))
        if reader.count != manifest["size"]:
            raise OSError(errno.EIO, f"{local_dir} changed while it was published ({reader.count} bytes sent, "
                          f"{manifest['size']} expected)")
        with self._errors("write", f"{full}.json"):
            self.client.put_object(Bucket=self.bucket, Key=f"{full}.json", Body=json.dumps(manifest).encode(),
                                   ContentType="application/json")
        return sum(f["size"] for f in manifest["files"])

    def dir_exists(self, key: str) -> bool:
        try:
            self._manifest(key)
        except FileNotFoundError:
            return False
        return True

    def list_dirs(self, prefix: str) -> list[str]:
        """The keys of the directories published directly under `prefix`: each name with both a .tar and a
        .json there (a .json alone is an object such as tracking.json; a .tar alone, an unfinished publish)."""
        names = set()
        for obj in self._objects(self._full_prefix(prefix), delimiter="/"):
            names.add(self._relative(obj["Key"]))
        return sorted(n[:-5] for n in names if n.endswith(".json") and f"{n[:-5]}.tar" in names)

    def fetch_dir(self, key: str, dest: Path) -> Path:
        """Extract the published directory to `dest` (which must not exist yet) from its streamed tar,
        members stripped of their arcname and passed through tarfile's "data" filter, appearing whole."""
        if Path(dest).exists() or Path(dest).is_symlink():  # refused before a byte is asked of the store
            raise FileExistsError(str(dest))
        manifest = self._manifest(key)

        def extract(tmp: Path) -> None:
            tmp.mkdir()
            stream = io.BufferedReader(_BodyReader(self._get(f"{key}.tar"), self._where(f"{key}.tar")), CHUNK)
            with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(tmp, members=_stripped(tar, manifest["arcname"]), filter="data")
            got = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
            if got != sum(f["size"] for f in manifest["files"]):
                raise OSError(errno.EIO, f"{self._where(key)}: the tar does not hold what its manifest lists")
        return appear_whole(dest, extract)

    def dir_manifest(self, key: str) -> dict:
        """The manifest of the directory published at `key`: each file's name, size and data offset in
        `<key>.tar`, so one file is read by a range (FileNotFoundError if none is published there)."""
        return self._manifest(key)

    def dir_tar(self, key: str, arcname: str) -> TarDownload:
        """The stored tar itself: its size from the manifest, its bytes by ranged GETs (S3 serves Range)."""
        manifest = self._manifest(key)
        if manifest["arcname"] != arcname:
            raise ValueError(f"{self._where(key)} was published under {manifest['arcname']!r}, not {arcname!r}")
        tar_key = f"{key}.tar"
        return TarDownload(manifest["size"], lambda start, end: _chunks(
            self._get(tar_key, f"bytes={start}-{end}"), self._where(tar_key), end - start + 1))

    def presign_dir(self, key: str, ttl_s: int, filename: str, method: str = "GET") -> str | None:
        return self._presign(f"{self._full(key)}.tar", ttl_s, filename, method)

    def remove_partial(self, prefix: str) -> None:
        """Abort the multipart uploads in progress under `prefix` and delete the tars that have no manifest
        (a publish killed before it finished). Only for a prefix no live writer uses."""
        full = self._full_prefix(prefix)
        self._ensure_bucket()
        with self._errors("list the uploads under", full):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full)
            uploads = [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])]
        for upload_key, upload_id in uploads:
            with contextlib.suppress(FileNotFoundError), self._errors("abort an upload of", upload_key):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload_key, UploadId=upload_id)
        keys = {o["Key"] for o in self._objects(full)}
        self._delete_keys([k for k in keys if k.endswith(".tar") and f"{k[:-4]}.json" not in keys])

    # --- the store's own plumbing ---

    def _full(self, key: str) -> str:
        parts = key_parts(key)
        return "/".join((self.prefix, *parts) if self.prefix else parts)

    def _full_prefix(self, prefix: str) -> str:
        """The object-key prefix of everything under `prefix` (a trailing "/": jobs/a never lists jobs/ab)."""
        prefix = prefix.strip("/")
        if prefix:
            return self._full(prefix) + "/"
        return self.prefix + "/" if self.prefix else ""

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    @contextlib.contextmanager
    def _errors(self, action: str, full: str):
        """Map boto3's errors on object key `full` to the interface's: FileNotFoundError for a missing key,
        else OSError(EIO) saying what failed where."""
        try:
            yield
        except ClientError as err:
            raise _mapped(err, f"{action} s3://{self.bucket}/{full}") from err
        except BotoCoreError as err:
            raise OSError(errno.EIO, f"object store at {self.client.meta.endpoint_url}: could not {action} "
                          f"s3://{self.bucket}/{full}: {err}") from err

    def _ensure_bucket(self) -> None:
        """Create the bucket on first use if it does not exist yet: a fresh SeaweedFS or MinIO just works,
        and credentials that may not create it get a message that says so."""
        if self._bucket_checked:
            return
        with self._lock:
            if self._bucket_checked:
                return
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as err:
                if _status(err) in (401, 403):
                    raise OSError(errno.EIO, f"object store: the bucket {self.bucket!r} refused these credentials "
                                  f"({_code(err)}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
                                  "profile, and that they may use this bucket") from err
                if _status(err) != 404:
                    raise _mapped(err, f"reach the bucket {self.bucket!r}") from err
                self._create_bucket()
            except BotoCoreError as err:
                raise OSError(errno.EIO, f"object store at {self.client.meta.endpoint_url} does not answer: {err}"
                              ) from err
            self._bucket_checked = True

    def _create_bucket(self) -> None:
        kwargs = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # the one region that refuses an explicit location
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
            log.info("created the bucket %s", self.bucket)
        except ClientError as err:
            if _code(err) == "BucketAlreadyOwnedByYou":  # another process made it meanwhile
                return
            raise OSError(errno.EIO, f"the bucket {self.bucket!r} does not exist and could not be created "
                          f"({_code(err)}: {_message(err)}): create it, or let these credentials create "
                          "buckets") from err

    def _upload_config(self, part_size: int) -> TransferConfig:
        """Multipart above one part, parts sent 4 at a time; the bandwidth cap (DPO_UPLOAD_MAX_BYTES_PER_S)
        keeps a background checkpoint upload from starving the training it runs beside."""
        config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=4,
                                max_bandwidth=self.max_bytes_per_s)
        config.max_in_memory_upload_chunks = 6  # parts read ahead of the senders (s3transfer's own setting)
        return config

    def _download_config(self) -> TransferConfig:
        return TransferConfig(multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
                              max_concurrency=4)

    def _upload(self, reader: _ChunkReader, key: str, config: TransferConfig) -> None:
        self._ensure_bucket()
        with self._errors("upload", self._full(key)):
            try:
                self.client.upload_fileobj(reader, self.bucket, self._full(key), Config=config)
            except Exception as err:
                # The source's own error (a refused upload, a full disk) is the one to report.
                if reader.error is not None and reader.error is not err:
                    raise reader.error from err
                raise

    def _get(self, key: str, byte_range: str | None = None):
        self._ensure_bucket()
        kwargs = {"Bucket": self.bucket, "Key": self._full(key)}
        if byte_range:
            kwargs["Range"] = byte_range
        with self._errors("read", kwargs["Key"]):
            return self.client.get_object(**kwargs)["Body"]

    def _head(self, full: str) -> dict | None:
        self._ensure_bucket()
        try:
            return self.client.head_object(Bucket=self.bucket, Key=full)
        except ClientError as err:
            if _status(err) == 404:
                return None
            raise _mapped(err, f"look up s3://{self.bucket}/{full}") from err
        except BotoCoreError as err:
            raise OSError(errno.EIO, f"object store: could not look up s3://{self.bucket}/{full}: {err}") from err

    def _manifest(self, key: str) -> dict:
        """The manifest of the directory published at `key`; FileNotFoundError if there is none (or the
        .json there is some other object)."""
        key_parts(key)  # `key` itself must be valid, not only `key`.json
        with self._get(f"{key}.json") as body, self._errors("read", self._full(key) + ".json"):
            raw = body.read()
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise FileNotFoundError(errno.ENOENT, "not a published directory", key) from None
        if not isinstance(manifest, dict) or not {"arcname", "size", "files"} <= manifest.keys():
            raise FileNotFoundError(errno.ENOENT, "not a published directory", key)
        return manifest

    def _objects(self, full_prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        self._ensure_bucket()
        kwargs = {"Bucket": self.bucket, "Prefix": full_prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        with self._errors("list", full_prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                yield from page.get("Contents", [])

    def _any_under(self, full_prefix: str) -> bool:
        with self._errors("list", full_prefix):
            return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=full_prefix, MaxKeys=1).get("KeyCount"))

    def _delete_keys(self, full_keys: list[str]) -> None:
        self._ensure_bucket()
        for i in range(0, len(full_keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": k} for k in full_keys[i:i + 1000]]
            with self._errors("delete", full_keys[i]):
                result = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := result.get("Errors"):
                raise OSError(errno.EIO, f"object store: could not delete s3://{self.bucket}/{errors[0]['Key']}: "
                              f"{errors[0].get('Code')} {errors[0].get('Message')}")

    def _presign(self, full: str, ttl_s: int, filename: str, method: str) -> str:
        """A URL for `method` (GET or HEAD) only: S3 signs the method, so a GET's URL refuses a HEAD."""
        disposition = f"attachment; filename*=UTF-8''{quote(filename)}"
        return self.presign_client.generate_presigned_url(
            _PRESIGNED[method], ExpiresIn=ttl_s,
            Params={"Bucket": self.bucket, "Key": full, "ResponseContentDisposition": disposition})


class _ChunkReader:
    """A read-only file over an iterator of byte chunks, for upload_fileobj: it pulls chunks only as a read
    asks for them, so a stream (an upload being received, a tar being built) never sits whole in memory.
    read(n) returns n bytes until the end (s3transfer takes a short read for the end of the stream). It
    keeps the iterator's own error, so the caller sees that rather than the transfer's wrapper of it."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks, self._buffer, self._ended = iter(chunks), bytearray(), False
        self.count, self.error = 0, None

    def read(self, size: int = -1) -> bytes:
        while not self._ended and (size < 0 or len(self._buffer) < size):
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                self._ended = True
            except BaseException as err:
                self.error = err
                raise
        size = len(self._buffer) if size < 0 else size
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.count += len(out)
        return out


class _BodyReader(io.RawIOBase):
    """A GET's body as a file whose failures are OSError (a dropped connection, a read timeout)."""

    def __init__(self, body, where: str):
        self._body, self._where = body, where

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        try:
            data = self._body.read(len(out))
        except (BotoCoreError, OSError) as err:
            raise OSError(errno.EIO, f"object store: reading {self._where} failed: {err}") from err
        out[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def _chunks(body, where: str, size: int) -> Iterator[bytes]:
    """A ranged GET's body in chunks, exactly `size` bytes or an OSError (never fewer in silence)."""
    with io.BufferedReader(_BodyReader(body, where), CHUNK) as reader:
        left = size
        while left > 0:
            chunk = reader.read(min(CHUNK, left))
            if not chunk:
                raise OSError(errno.EIO, f"object store: {where} ended before the range asked for")
            left -= len(chunk)
            yield chunk


def _stripped(tar: tarfile.TarFile, arcname: str) -> Iterator[tarfile.TarInfo]:
    """The tar's members with `arcname/` taken off their names; anything outside it is refused."""
    for member in tar:
        if member.name == arcname:
            continue
        if not member.name.startswith(arcname + "/"):
            raise OSError(errno.EIO, f"unexpected member {member.name!r} outside {arcname!r}/ in a stored tar")
        member.name = member.name[len(arcname) + 1:]
        yield member


def _part_for(size: int) -> int:
    """A part size (whole MiB) that keeps a `size`-byte upload within S3's part count."""
    return math.ceil(size / MAX_PARTS / (1 << 20)) << 20


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _message(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Message", "")) or str(err)


def _status(err: ClientError) -> int | None:
    return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _mapped(err: ClientError, what: str) -> OSError:
    if _code(err) in _MISSING or (_status(err) == 404 and _code(err) != "NoSuchBucket"):
        return FileNotFoundError(errno.ENOENT, "not in the object store", what.split(" ")[-1])
    return OSError(errno.EIO, f"object store: could not {what}: {_code(err) or _status(err)} {_message(err)}")
