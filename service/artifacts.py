"""Artifacts (uploads, checkpoints, final models) behind one small interface.

Keys are relative POSIX paths: an upload's is `upload_key` (`files/file-abc.jsonl`), and a job's output
directory is `job_key` (`jobs/ftjob-abc`), laid out inside as dpo_core.layout says (`checkpoint-10/`, ...).
`LocalStorage` keeps them under a local directory (file://, the data directory by default);
`service.s3store.S3Storage` keeps them in an S3-compatible object store (s3://bucket/prefix).
"""
from __future__ import annotations

import errno
import logging
import os
import re
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
# What an interrupted write leaves (see temporary_sibling): remove_partial removes these, list_dirs never shows them.
_TEMPORARY = re.compile(r"\..+\.(tmp|old)-\d+-\d+")
log = logging.getLogger("dpo.storage")


def upload_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def state_key(job_id: str, name: str | None = None) -> str:
    """Where a running job keeps the state a resumed run goes on from (metrics.jsonl, tracking.json,
    tensorboard/): apart from the result files of the same names, which a job that succeeded registers.
    Without a name: the folder of them all."""
    return f"{job_key(job_id)}/state" + (f"/{name}" if name else "")


def job_key(job_id: str) -> str:
    """The key of the job's output directory: its checkpoints, final model and metrics (dpo_core.layout)."""
    return f"jobs/{job_id}"


def key_parts(key: str) -> tuple[str, ...]:
    """The parts of a valid key. Keys come from our own ids, but one that is empty, absolute or climbs
    (`..`) must never reach a disk or a bucket: ValueError."""
    parts = PurePosixPath(key).parts
    if not parts or PurePosixPath(key).is_absolute() or ".." in parts:
        raise ValueError(f"invalid storage key {key!r}")
    return parts


class Storage(Protocol):
    """Where artifacts live: `LocalStorage` (file://, the data directory) or `S3Storage` (s3://bucket/prefix,
    service.s3store). Keys are relative POSIX paths. Two kinds of artifact:

    - an object (an upload, a result file): put_stream / put_file, open / read_range, fetch_file, presign;
    - a published directory (a checkpoint, a final model, tensorboard/): publish_dir makes it appear whole or
      not at all (LocalStorage: hard links into a temporary name, then one rename; S3Storage: one tar object
      `<key>.tar`, members under `arcname/`, then its manifest `<key>.json`, written last: a directory
      exists only once its manifest does). fetch_dir materializes it on local disk, dir_tar streams it as a
      tar download, presign_dir gives a URL to that tar (None where the store cannot sign one).

    presign and presign_dir sign one HTTP method (GET, or HEAD for a client that asks the size first).

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
    def presign(self, key: str, ttl_s: int, filename: str, method: str = "GET") -> str | None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str) -> Iterator[StoredObject]: ...

    def publish_dir(self, local_dir: Path, key: str, arcname: str) -> int: ...
    def dir_exists(self, key: str) -> bool: ...
    def list_dirs(self, prefix: str) -> list[str]: ...
    def fetch_dir(self, key: str, dest: Path) -> Path: ...
    def dir_tar(self, key: str, arcname: str) -> TarDownload: ...
    def presign_dir(self, key: str, ttl_s: int, filename: str, method: str = "GET") -> str | None: ...
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
    """Artifacts as files and directories under `root`. Nothing is ever reached through a symbolic link, no
    key climbs out of root, and every artifact appears whole under its name or not at all."""

    remote = False  # bytes stay on this machine: publish inline, read inputs in place

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        return self.root.joinpath(*key_parts(key))

    def key_for(self, path: str | Path) -> str:
        """The key of a local path under root (for directories the trainer wrote)."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write the chunks under `key` as they come; returns the bytes written. The key appears only once
        the chunks ran out: any error meanwhile (a full disk, or the iterable raising because its source
        was refused) leaves nothing, neither the key nor a temporary file."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
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

    def put_file(self, key: str, path: Path) -> int:
        """A copy of the local file at `path` (not a link: the source may still grow, as metrics.jsonl does)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        return self.put_stream(key, iter_file(os.fdopen(fd, "rb")))

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

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes `start` to `end` (inclusive) of the object; the file is opened before the first chunk is
        asked for, so a missing key fails the call itself, not the response halfway."""
        handle = self.open(key)
        handle.seek(start)
        return _read_exactly(handle, end - start + 1, key)

    def fetch_file(self, key: str, dest: Path) -> Path:
        """The store's own file: local reads need no copy, so `dest` is left alone."""
        self.open(key).close()  # a regular file, reached through no link
        return self.path(key)

    def presign(self, key: str, ttl_s: int, filename: str, method: str = "GET") -> str | None:
        return None  # files are served by the API itself

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def size(self, key: str) -> int:
        """Bytes of the file at `key`, or of the regular files under the directory (symlinks not followed);
        FileNotFoundError when neither is there."""
        target = self.path(key)
        if not target.is_dir():
            if not target.is_file():
                raise FileNotFoundError(key)
            return target.stat().st_size
        return sum(p.lstat().st_size for p in target.rglob("*") if p.is_file() and not p.is_symlink())

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every regular file under `prefix` ("" for all), inside published directories and temporary
        leftovers included (the sweep judges them); symbolic links are neither listed nor entered."""
        base = self._prefix_dir(prefix)
        if base is None:
            return
        for parent, _dirs, files, dir_fd in os.fwalk(base, follow_symlinks=False):
            for name in sorted(files):
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode):
                    key = (Path(parent) / name).relative_to(self.root).as_posix()
                    yield StoredObject(key, info.st_size, info.st_mtime)

    def publish_dir(self, local_dir: Path, key: str, arcname: str) -> int:
        """Hard links to `local_dir`'s files (copies across filesystems) under a temporary name, then one
        rename: the directory appears whole, replacing any earlier one. Returns its bytes. Links under
        `local_dir` are left out; `arcname` matters only to the tar of a download."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(target)
        try:
            size = link_tree(Path(local_dir), tmp)
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return size

    def dir_exists(self, key: str) -> bool:
        """Whether a directory is at `key`, reached through no symbolic link."""
        self.path(key)
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            return False
        try:
            for part in PurePosixPath(key).parts:
                parent, fd = fd, os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(parent)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                return False
            raise
        finally:
            os.close(fd)
        return True

    def list_dirs(self, prefix: str) -> list[str]:
        """The keys of the published directories directly under `prefix`, sorted (temporaries left out)."""
        base = self._prefix_dir(prefix)
        if base is None:
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.iterdir()
                      if not p.name.startswith(".") and p.is_dir() and not p.is_symlink())

    def fetch_dir(self, key: str, dest: Path) -> Path:
        """The published directory at `dest` (which must not exist yet), as hard links (copies across
        filesystems), appearing whole: an interrupted fetch leaves no directory a resume could take."""
        source = self._dir_path(key)
        return appear_whole(dest, lambda tmp: link_tree(source, tmp))

    def dir_tar(self, key: str, arcname: str) -> TarDownload:
        """The directory as a tar under `arcname/`, listed now (a missing one fails here, not mid-download)."""
        directory = self._dir_path(key)
        entries = tar_entries(directory)
        return TarDownload(tar_size(directory, arcname, entries),
                           lambda start, end: iter_tar(directory, arcname, entries, start, end))

    def presign_dir(self, key: str, ttl_s: int, filename: str, method: str = "GET") -> str | None:
        return None

    def remove_partial(self, prefix: str) -> None:
        """Remove what interrupted writes left under `prefix` (their temporary files and directories).
        Only for a prefix nothing writes to meanwhile: a live write's temporary would go too."""
        base = self._prefix_dir(prefix)
        if base is None:
            return
        for parent, dirs, files, _fd in os.fwalk(base, follow_symlinks=False):
            for name in [n for n in dirs + files if _TEMPORARY.fullmatch(n)]:
                path = Path(parent) / name
                if name in dirs:
                    dirs.remove(name)  # gone: not walked into
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def _prefix_dir(self, prefix: str) -> Path | None:
        """The directory a prefix names ("" for root); None if there is none, or a link is on the way."""
        prefix = prefix.strip("/")
        if not prefix:
            return self.root if self.root.is_dir() else None
        return self.path(prefix) if self.dir_exists(prefix) else None

    def _dir_path(self, key: str) -> Path:
        """The path of the published directory at `key`; FileNotFoundError if none (or a link on the way)."""
        if not self.dir_exists(key):
            raise FileNotFoundError(key)
        return self.path(key)


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


def tar_manifest(directory: Path, arcname: str, entries: list[tuple[Path, os.stat_result]]) -> dict:
    """What a published directory's manifest records of iter_tar(directory, arcname, entries): the arcname,
    the tar's exact size, and each regular file's path (relative to the directory), size and data offset
    in the tar, so one file can be read out of the stored tar by a range."""
    files, pos = [], 0
    for path, header, size in _members(directory, arcname, entries):
        if size is not None:
            files.append({"name": path.relative_to(directory).as_posix(), "size": size, "offset": pos + len(header)})
        pos += len(header) + (size or 0) + (-(size or 0) % tarfile.BLOCKSIZE)
    return {"arcname": arcname, "size": pos + 2 * tarfile.BLOCKSIZE, "files": files}


def iter_tar(directory: Path, arcname: str, entries: list[tuple[Path, os.stat_result]] | None = None,
             start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Stream an uncompressed tar of `directory` (entries under `arcname/`) without buffering whole files;
    exactly tar_size() bytes, so a response can announce its length, or bytes `start` to `end` of it
    (inclusive, as an HTTP Range says them): the members before `start` are skipped by their sizes and
    files are entered with a seek, so a resumed download reads nothing it does not send. Only directories
    and regular files are written, each file with the size the listing saw (a file that changed since is
    cut or padded). Each file is opened without following a link at any step below `directory`: one
    swapped for a link (or for something not a regular file) after the listing breaks the download off
    (OSError) rather than send a file from elsewhere or fewer bytes than announced."""
    entries = entries if entries is not None else tar_entries(directory)
    stop = float("inf") if end is None else end + 1
    root = os.open(directory, _DIR_FLAGS)
    try:
        pos = 0
        for path, header, size in _members(directory, arcname, entries):
            length = len(header) + (size or 0) + (-(size or 0) % tarfile.BLOCKSIZE)
            if pos >= stop:
                return
            if pos + length > start:
                yield from _member_bytes(root, directory, path, header, size, start - pos, stop - pos)
            pos += length
    finally:
        os.close(root)
    # The end-of-archive marker: two zero blocks.
    yield from _cut(b"\0" * (2 * tarfile.BLOCKSIZE), start - pos, stop - pos)


def _member_bytes(root: int, directory: Path, path: Path, header: bytes, size: int | None,
                  lo: float, hi: float) -> Iterator[bytes]:
    """Bytes `lo` to `hi` (exclusive; either may lie outside) of one member: its header, data and padding."""
    if size is None:
        yield from _cut(header, lo, hi)
        return
    fd = _open_below(root, path.relative_to(directory).parts)
    if fd is None:
        raise OSError(errno.ELOOP, "swapped for a link or a special file since the listing", str(path))
    with os.fdopen(fd, "rb") as handle:
        yield from _cut(header, lo, hi)
        first, last = max(lo - len(header), 0), min(hi - len(header), size)
        if last > first:
            handle.seek(int(first))
            yield from _exactly(handle, int(last - first))
    pad = -size % tarfile.BLOCKSIZE
    yield from _cut(b"\0" * pad, lo - len(header) - size, hi - len(header) - size)


def _cut(block: bytes, lo: float, hi: float) -> Iterator[bytes]:
    """The part of `block` between offsets `lo` and `hi` (clipped to it), unless that part is empty."""
    lo, hi = max(lo, 0), min(hi, len(block))
    if hi > lo:
        yield block[int(lo):int(hi)]


def _read_exactly(handle: BinaryIO, size: int, key: str) -> Iterator[bytes]:
    # A range is answered with the length announced, or broken off: never fewer bytes in silence.
    with handle:
        left = size
        while left > 0:
            chunk = handle.read(min(CHUNK, left))
            if not chunk:
                raise OSError(errno.EIO, f"{key} ended before the range asked for")
            left -= len(chunk)
            yield chunk


def appear_whole(dest: Path, fill: Callable[[Path], object]) -> Path:
    """Make the directory `dest` (which must not exist yet) with fill(tmp) under a temporary sibling, then
    rename it into place: an interrupted fill leaves neither `dest` nor the temporary directory."""
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(dest)
    try:
        fill(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def temporary_sibling(target: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `target` for this process and thread to build it in (matches _TEMPORARY)."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{threading.get_ident()}")


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`; an earlier directory there is moved aside first and then removed."""
    try:
        os.rename(tmp, target)
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    old = temporary_sibling(target, "old")
    os.rename(target, old)
    os.rename(tmp, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def link_tree(source: Path, dest: Path) -> int:
    """Recreate `source`'s directories and regular files at `dest` (which must not exist) as hard links,
    or copies where links cannot be made (another filesystem); symbolic links are left out and never
    followed. Returns the files' bytes."""
    entries = tar_entries(source)
    root = os.open(source, _DIR_FLAGS)
    try:
        size = 0
        for path, info in entries:
            parts = path.relative_to(source).parts
            if stat.S_ISDIR(info.st_mode):
                dest.joinpath(*parts).mkdir()
            else:
                size += _link_file(root, parts, dest.joinpath(*parts))
        return size
    finally:
        os.close(root)


def _link_file(root: int, parts: tuple[str, ...], target: Path) -> int:
    """Hard-link (else copy) the regular file at `parts` below directory fd `root`; its size, 0 if it
    turned out not to be a regular file (left out)."""
    parent, opened = root, []
    try:
        for part in parts[:-1]:
            parent = os.open(part, _DIR_FLAGS, dir_fd=parent)
            opened.append(parent)
        try:
            os.link(parts[-1], target, src_dir_fd=parent, follow_symlinks=False)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            return _copy_file(parent, parts[-1], target)
    finally:
        for fd in opened:
            os.close(fd)
    info = target.lstat()
    if not stat.S_ISREG(info.st_mode):  # swapped for a link since the listing: linkat linked the link itself
        target.unlink()
        log.warning("not publishing %s: not a regular file", target)
        return 0
    return info.st_size


def _copy_file(parent: int, name: str, target: Path) -> int:
    fd = _open_below(parent, (name,))
    if fd is None:
        return 0
    with os.fdopen(fd, "rb") as src, target.open("xb") as out:
        shutil.copyfileobj(src, out, CHUNK)
        os.chmod(out.fileno(), os.fstat(src.fileno()).st_mode & 0o777)
        return out.tell()


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
