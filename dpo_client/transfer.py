"""Uploads and downloads with a progress bar, both streamed: an upload is read from disk as it is sent,
and a checkpoint's tar is extracted as it arrives, so neither is ever held whole in memory or on disk."""
from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from dpo_client.api import Api
from dpo_client.errors import ClientError

# The service validates an upload as it stores it, and answers once the last line is checked.
UPLOAD_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
DOWNLOAD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def _bar(console: Console, verb: str) -> Progress:
    return Progress(SpinnerColumn(), TextColumn(f"{verb} [bold]{{task.description}}"), BarColumn(),
                    TaskProgressColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def upload(api: Api, path: Path, console: Console) -> dict:
    """POST `path` to /v1/files (purpose fine-tune); the file object the API returns."""
    try:
        handle = path.open("rb")
    except OSError as err:
        raise ClientError(f"cannot read {path}: {err.strerror}") from None
    with handle, _bar(console, "Uploading") as progress:
        reader = progress.wrap_file(handle, total=path.stat().st_size, description=path.name)
        files = {"file": (path.name, reader, "application/jsonl")}
        return api.post("/v1/files", files=files, data={"purpose": "fine-tune"}, timeout=UPLOAD_TIMEOUT)


def download(api: Api, job_id: str, checkpoint_id: str, out_dir: Path, console: Console) -> Path:
    """Fetch a checkpoint's tar and extract it as `out_dir/<checkpoint_id>`; that directory.

    It is extracted into a temporary directory beside it first, so an interrupted download never
    leaves a half-written model under the checkpoint's name."""
    target = out_dir / checkpoint_id
    if target.exists():
        raise ClientError(f"{target} already exists; remove it, or pass -o another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{checkpoint_id}.", dir=out_dir))
    try:
        path = f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{checkpoint_id}/content"
        # With an object store the API answers a redirect to a presigned URL; httpx drops the API key
        # when it follows one to another host.
        with _bar(console, "Downloading") as progress, api.stream("GET", path, timeout=DOWNLOAD_TIMEOUT,
                                                                   follow_redirects=True) as r:
            length = r.headers.get("Content-Length")  # the service sends the tar's exact length
            task = progress.add_task(checkpoint_id, total=int(length) if length and length.isdigit() else None)
            body = _Body(r.iter_bytes(), lambda n: progress.advance(task, n))
            _extract(body, staging, checkpoint_id)
        (staging / checkpoint_id).rename(target)
    except httpx.TransportError as err:
        raise api.unreachable(err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract(body: io.RawIOBase, into: Path, root: str) -> None:
    """Extract a tar stream whose every entry lies under `root/`, with tarfile's `data` filter: no absolute
    paths, no `..`, no links out, no devices, no set-uid bits."""
    def only_under_root(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        member = tarfile.data_filter(member, dest)
        if member.name != root and not member.name.startswith(f"{root}/"):
            raise ClientError(f"the download holds {member.name!r}, outside {root}/; nothing was kept")
        return member

    try:
        with tarfile.open(fileobj=body, mode="r|") as tar:
            tar.extractall(into, filter=only_under_root)
    except tarfile.TarError as err:
        raise ClientError(f"the download is not a valid checkpoint archive ({err}); nothing was kept") from None
    if not (into / root).is_dir():
        raise ClientError(f"the download holds no {root}/ directory; nothing was kept")


class _Body(io.RawIOBase):
    """A response body as a readable file, for tarfile's stream mode; reports each chunk's size."""

    def __init__(self, chunks: Iterator[bytes], on_read: Callable[[int], None]):
        self._chunks, self._on_read, self._buffer = chunks, on_read, b""

    def readable(self) -> bool:
        return True

    def readinto(self, out) -> int:
        while not self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._on_read(len(chunk))
            self._buffer = chunk
        n = min(len(out), len(self._buffer))
        out[:n], self._buffer = self._buffer[:n], self._buffer[n:]
        return n
