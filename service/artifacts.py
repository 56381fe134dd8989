"""Artifacts (uploads, checkpoints, final models) behind one small interface.

Keys are relative POSIX paths: an upload's is `upload_key` (`files/file-abc.jsonl`), and a job's output
directory is `job_key` (`jobs/ftjob-abc`), laid out inside as dpo_core.layout says (`checkpoint-10/`, ...).
`LocalStorage` keeps them under the data directory; a shared filesystem (NFS) mounted at the same
path on every machine works unchanged, and an object store can implement the same six methods.
`path()` exists because the trainer reads and writes local directories.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from sqlalchemy.orm import Session

CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
log = logging.getLogger("dpo.storage")


def upload_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def job_key(job_id: str) -> str:
    """The key of the job's output directory: its checkpoints, final model and metrics (dpo_core.layout)."""
    return f"jobs/{job_id}"


class Storage(Protocol):
    """Where artifacts live: `LocalStorage` (file://, the data directory) or `S3Storage` (s3://bucket/prefix,
    service.s3store). Keys are relative POSIX paths. Two kinds of artifact:

    - an object (an upload, a result file): put_stream / put_file, open / read_range, fetch_file, presign;
    - a published directory (a checkpoint, a final model, tensorboard/): publish_dir makes it appear whole or
      not at all (LocalStorage: hard links into a temporary name, then one rename; S3Storage: one tar object
      `<key>.tar`, members under `arcname/`, then its manifest `<key>.json`, written last: a directory
      exists only once its manifest does). fetch_dir materializes it on local disk, dir_tar streams it as a
      tar download, presign_dir gives a URL to that tar (None where the store cannot sign one).

    exists, size and delete take either kind (delete removes everything under a key, a directory's tar and
    manifest included). Every method raises FileNotFoundError for a key that is not there (exists aside)
    and OSError for a failed store, so callers handle one kind of error whatever the store.
    """

    remote: bool  # True when bytes cross a network (publish in the background; download inputs first)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int: ...
    def put_file(self, key: str, path: Path) -> int: ...
    def open(self, key: str) -> BinaryIO: ...
    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]: ...
    def fetch_file(self, key: str, dest: Path) -> Path: ...
    def presign(self, key: str, ttl_s: int, filename: str) -> str | None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str) -> Iterator[StoredObject]: ...

    def publish_dir(self, local_dir: Path, key: str, arcname: str) -> int: ...
    def dir_exists(self, key: str) -> bool: ...
    def list_dirs(self, prefix: str) -> list[str]: ...
    def fetch_dir(self, key: str, dest: Path) -> Path: ...
    def dir_tar(self, key: str, arcname: str) -> TarDownload: ...
    def presign_dir(self, key: str, ttl_s: int, filename: str) -> str | None: ...
    def remove_partial(self, prefix: str) -> None: ...


@dataclass(frozen=True)
class StoredObject:
    """One stored object (LocalStorage: one regular file) as the orphan sweep sees it."""

    key: str
    size: int
    modified: float  # seconds since the epoch


@dataclass(frozen=True)
class TarDownload:
    """A published directory as a tar download: its exact length, and its bytes from `start` to `end`
    (inclusive, as an HTTP Range says them), streamed, never assembled in memory."""

    size: int
    read: Callable[[int, int], Iterator[bytes]]


class LocalStorage:
    """Artifacts as files and directories under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        # Keys come from our own ids, but a key that climbs out of root must never reach the disk.
        if not parts or PurePosixPath(key).is_absolute() or ".." in parts:
            raise ValueError(f"invalid storage key {key!r}")
        return self.root.joinpath(*parts)

    def key_for(self, path: str | Path) -> str:
        """The key of a local path under root (for directories the trainer wrote)."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write the chunks under `key` as they come; returns the bytes written. The key appears only once
        the chunks ran out: any error meanwhile (a full disk, or the iterable raising because its source
        was refused) leaves nothing, neither the key nor a temporary file."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        size = 0
        try:
            with tmp.open("wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
            os.replace(tmp, target)  # readers never see a half-written file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def open(self, key: str) -> BinaryIO:
        """The regular file at `key`, for reading. FileNotFoundError if there is none, or if a symbolic
        link is on the way: a link a job left in its directory never serves a file from elsewhere."""
        self.path(key)  # validates the key
        root = os.open(self.root, _DIR_FLAGS)
        try:
            fd = _open_below(root, PurePosixPath(key).parts)
        finally:
            os.close(root)
        if fd is None:
            raise FileNotFoundError(key)
        return os.fdopen(fd, "rb")

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def size(self, key: str) -> int:
        """Bytes of the file at `key`, or of the regular files under the directory (symlinks not followed);
        0 when nothing is there."""
        target = self.path(key)
        if not target.is_dir():
            return target.stat().st_size if target.is_file() else 0
        return sum(p.lstat().st_size for p in target.rglob("*") if p.is_file() and not p.is_symlink())


def delete_with_artifact(session: Session, storage: Storage, row) -> None:
    """Delete `row` (a File or a Checkpoint: it names its artifact by `storage_key`), then the artifact.
    The row is committed first: a failure after it leaves bytes no row names, never a row without them."""
    session.delete(row)
    session.commit()
    storage.delete(row.storage_key)


def iter_file(handle: BinaryIO) -> Iterator[bytes]:
    """Yield a file's bytes in chunks and close it."""
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _exactly(handle: BinaryIO, size: int) -> Iterator[bytes]:
    # The header promised `size` bytes; a file that changed since must not corrupt the archive.
    left = size
    while left and (chunk := handle.read(min(CHUNK, left))):
        left -= len(chunk)
        yield chunk
    if left:
        yield b"\0" * left


def tar_entries(directory: Path) -> list[tuple[Path, os.stat_result]]:
    """The directory and the directories and regular files under it, each with its stat, read before a
    byte is sent (so a missing checkpoint is a 404, not a broken download). FileNotFoundError if the
    directory is gone or is itself a symbolic link. Symbolic links (and pipes, devices) under it are left
    out, never followed: a link planted in a job's directory must not serve a file of the API's host."""
    try:
        top = directory.lstat()
    except FileNotFoundError:
        raise FileNotFoundError(str(directory)) from None
    if not stat.S_ISDIR(top.st_mode):
        raise FileNotFoundError(str(directory))
    entries = [(directory, top)]
    for parent, dirs, files, _fd in os.fwalk(directory, follow_symlinks=False):  # links are never entered
        for name in sorted(dirs + files):
            path = Path(parent) / name
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                entries.append((path, info))
            else:
                log.warning("not serving %s: not a regular file or directory", path)
    return sorted(entries, key=lambda e: e[0])


def _members(directory: Path, arcname: str, entries: list[tuple[Path, os.stat_result]]
             ) -> Iterator[tuple[Path, bytes, int | None]]:
    """Each entry's path, tar header and file size (None for a directory) as the listing saw them: the one
    description of the archive that both iter_tar and tar_size read."""
    for path, info_stat in entries:
        name = arcname if path == directory else f"{arcname}/{path.relative_to(directory).as_posix()}"
        if stat.S_ISDIR(info_stat.st_mode):
            yield path, _header(name, info_stat, tarfile.DIRTYPE, 0), None
        else:
            yield path, _header(name, info_stat, tarfile.REGTYPE, info_stat.st_size), info_stat.st_size


def tar_size(directory: Path, arcname: str, entries: list[tuple[Path, os.stat_result]]) -> int:
    """The exact length in bytes of iter_tar(directory, arcname, entries): each header as written (PAX
    extended headers for long names included), file data padded to 512-byte blocks, the two end blocks."""
    total = 2 * tarfile.BLOCKSIZE
    for _path, header, size in _members(directory, arcname, entries):
        total += len(header) + (size or 0) + (-(size or 0) % tarfile.BLOCKSIZE)
    return total


def iter_tar(directory: Path, arcname: str, entries: list[tuple[Path, os.stat_result]] | None = None
             ) -> Iterator[bytes]:
    """Stream an uncompressed tar of `directory` (entries under `arcname/`) without buffering whole files;
    exactly tar_size() bytes, so a response can announce its length. Only directories and regular files
    are written, each file with the size the listing saw (a file that changed since is cut or padded).
    Each file is opened without following a link at any step below `directory`: one swapped for a link
    (or for something not a regular file) after the listing breaks the download off (OSError) rather
    than send a file from elsewhere or fewer bytes than announced."""
    entries = entries if entries is not None else tar_entries(directory)
    root = os.open(directory, _DIR_FLAGS)
    try:
        for path, header, size in _members(directory, arcname, entries):
            if size is None:
                yield header
                continue
            fd = _open_below(root, path.relative_to(directory).parts)
            if fd is None:
                raise OSError(errno.ELOOP, "swapped for a link or a special file since the listing", str(path))
            with os.fdopen(fd, "rb") as handle:
                yield header
                yield from _exactly(handle, size)
            if pad := -size % tarfile.BLOCKSIZE:
                yield b"\0" * pad
    finally:
        os.close(root)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker


def _header(name: str, info_stat: os.stat_result, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode, info.type, info.size = int(info_stat.st_mtime), info_stat.st_mode & 0o777, kind, size
    return info.tobuf(tarfile.PAX_FORMAT)


def _open_below(root: int, parts: tuple[str, ...]) -> int | None:
    """A regular file under directory fd `root`, opened through no symbolic link; None if there is none."""
    fd, opened = root, []
    try:
        for part in parts[:-1]:
            fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            opened.append(fd)
        # O_NONBLOCK: a pipe put in the file's place must not block the open.
        file = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):  # a link, or under one, since the listing: left out
            return None
        raise  # gone since the listing (pruned?): the download breaks off rather than lie
    finally:
        for d in opened:
            os.close(d)
    if not stat.S_ISREG(os.fstat(file).st_mode):
        os.close(file)
        return None
    return file


def make_storage(settings) -> Storage:
    """The store DPO_STORAGE_URL names: file:///path (LocalStorage) or s3://bucket/prefix (S3Storage)."""
    url = urlsplit(settings.store_url)
    if url.scheme == "file":
        return LocalStorage(Path(unquote(url.path)))
    if url.scheme == "s3":
        from service.s3store import S3Storage  # boto3 is imported only where an object store is used

        return S3Storage.from_settings(settings)
    raise ValueError(f"DPO_STORAGE_URL must start with file:// or s3://, not {settings.store_url!r}")
