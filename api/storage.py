"""Artifacts (uploads, checkpoints, final models) behind one small interface.

Keys are relative POSIX paths such as `files/file-abc.jsonl` or `jobs/ftjob-abc/checkpoint-10`.
`LocalStorage` keeps them under the data directory; a shared filesystem (NFS) mounted at the same
path on every machine works unchanged, and an object store can implement the same six methods.
`path()` exists because the trainer reads and writes local directories.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

CHUNK = 1 << 20


class Storage(Protocol):
    def put(self, key: str, data: bytes) -> int: ...
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int: ...
    def open(self, key: str) -> BinaryIO: ...
    def path(self, key: str) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


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

    def put(self, key: str, data: bytes) -> int:
        return self.put_stream(key, (data,))

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
        return self.path(key).open("rb")

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def iter_file(handle: BinaryIO) -> Iterator[bytes]:
    """Yield a file's bytes in chunks and close it."""
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _exactly(path: Path, size: int) -> Iterator[bytes]:
    # The header promised `size` bytes; a file that changed since must not corrupt the archive.
    left = size
    with path.open("rb") as handle:
        while left and (chunk := handle.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk
    if left:
        yield b"\0" * left


def tar_entries(directory: Path) -> list[tuple[Path, os.stat_result]]:
    """The directory and everything under it, each with its stat, read before a byte is sent (so a
    missing checkpoint is a 404, not a broken download). FileNotFoundError if the directory is gone."""
    paths = [directory, *sorted(directory.rglob("*"))] if directory.is_dir() else []
    if not paths:
        raise FileNotFoundError(str(directory))
    return [(p, p.stat()) for p in paths]


def iter_tar(directory: Path, arcname: str, entries: list[tuple[Path, os.stat_result]] | None = None
             ) -> Iterator[bytes]:
    """Stream an uncompressed tar of `directory` (entries under `arcname/`) without buffering whole files."""
    for path, stat in entries if entries is not None else tar_entries(directory):
        name = arcname if path == directory else f"{arcname}/{path.relative_to(directory).as_posix()}"
        info = tarfile.TarInfo(name)
        info.mtime, info.mode = int(stat.st_mtime), stat.st_mode & 0o777
        if path.is_dir():
            info.type = tarfile.DIRTYPE
            yield info.tobuf(tarfile.PAX_FORMAT)
            continue
        info.size = stat.st_size
        yield info.tobuf(tarfile.PAX_FORMAT)
        yield from _exactly(path, info.size)
        if pad := -info.size % tarfile.BLOCKSIZE:
            yield b"\0" * pad
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker
