"""The worker's scratch directory: the only local disk a job uses, on a worker that shares nothing with
the API but the database, the broker and the store.

`settings.worker_scratch_dir/<worker name>/` belongs to one worker process while it lives: it holds an
flock on `.lock` inside it (inherited by its job processes, so a job that outlives its worker keeps it
too). A worker that starts removes its siblings whose lock it can take: scratch directories of workers
that died without cleaning up. Each run works in `<job_id>/` below it, removed when the run ends,
whatever the outcome:

    <job_id>/data/                the uploaded training and validation files (a local store's are read in place)
    <job_id>/output/<job_id>/     the trainer's output_dir, named by the job's id (which trackers take as the
                                  run's name): checkpoints fetched from the store, then written
    <job_id>/output/.publish/     checkpoints staged for upload (worker.publisher)
    <job_id>/parent/              the checkpoint the job continues from
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dpo.worker")
LOCK_FILE = ".lock"


def dir_name(worker_name: str) -> str:
    """A worker name as one safe path component."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", worker_name).lstrip(".") or "worker"


class Scratch:
    """One worker's scratch directory, locked while this object is open (see the module's docstring)."""

    def __init__(self, root: Path, worker_name: str):
        self.root = Path(root)
        self.path = self.root / dir_name(worker_name)
        self._lock: int | None = None

    def claim(self) -> Scratch:
        """Lock this worker's directory (emptied: what a run left is of no use), then remove dead siblings.
        A directory of the same name still locked (a job process that outlived its worker) is left to
        it: this worker takes `<name>-<pid>` instead, removed as a dead sibling once it is gone."""
        fd = self._lock_dir(self.path)
        if fd is None:
            log.warning("scratch directory %s is still in use (a job process of an earlier worker of the same "
                        "name?); this worker uses one of its own", self.path)
            self.path = self.path.with_name(f"{self.path.name}-{os.getpid()}")
            fd = self._lock_dir(self.path)
        self._lock = fd
        for child in self.path.iterdir():
            if child.name != LOCK_FILE:
                _remove(child)
        self._remove_dead_siblings()
        return self

    @staticmethod
    def _lock_dir(path: Path) -> int | None:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _remove_dead_siblings(self) -> None:
        for sibling in self.root.iterdir():
            if sibling == self.path or not sibling.is_dir() or sibling.is_symlink():
                continue
            try:
                fd = os.open(sibling / LOCK_FILE, os.O_RDWR)
            except FileNotFoundError:
                continue  # not a worker's scratch directory, or one just being made
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its worker lives
            else:
                log.info("removing %s, the scratch directory of a worker that is gone", sibling)
                _remove(sibling)
            finally:
                os.close(fd)

    @contextmanager
    def run(self, job_id: str) -> Iterator[RunDirs]:
        """A run's directories, empty at the start and removed at the end, whatever happened."""
        dirs = RunDirs(self.path / dir_name(job_id))
        _remove(dirs.root)  # what a run of this job left when its process was killed
        for d in (dirs.data, dirs.output, dirs.parent):  # output's parent too
            d.mkdir(parents=True)
        try:
            yield dirs
        finally:
            _remove(dirs.root)


@dataclass(frozen=True)
class RunDirs:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def output(self) -> Path:
        return self.root / "output" / self.root.name

    @property
    def parent(self) -> Path:
        return self.root / "parent"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
