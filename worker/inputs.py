"""What a run reads, brought from the store onto the worker's scratch disk (worker.scratch) before it
trains: the uploaded files, what earlier runs of the job published (its checkpoints, so that
`resume_from: auto` finds the latest, and the state the trainer goes on appending to), the
checkpoint the job continues from, and its team's precomputed reference log-probs for it.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dpo_core.layout import METRICS_FILE, TENSORBOARD_DIR, TRACKING_FILE, list_checkpoints
from dpo_core.spec import TrainingSpec
from service import parents, reference_cache
from service.artifacts import Storage, job_key, state_key
from worker.scratch import RunDirs

log = logging.getLogger("dpo.worker")

_CHECKPOINT_PREFIX = "checkpoint-"


def fetch_upload(storage: Storage, key: str, dirs: RunDirs) -> str:
    """An uploaded file's local path (a local store's own file; a remote store's copy in data/)."""
    return str(storage.fetch_file(key, dirs.data / Path(key).name))


def fetch_output(storage: Storage, job_id: str, output: Path) -> list[int]:
    """Every checkpoint the job published, and its state objects, into `output`; returns the steps."""
    for key in storage.list_dirs(job_key(job_id)):
        name = key.rsplit("/", 1)[-1]
        if name.startswith(_CHECKPOINT_PREFIX):
            storage.fetch_dir(key, output / name)
    if storage.dir_exists(state_key(job_id, TENSORBOARD_DIR)):
        storage.fetch_dir(state_key(job_id, TENSORBOARD_DIR), output / TENSORBOARD_DIR)
    for name in (METRICS_FILE, TRACKING_FILE):
        try:
            got = storage.fetch_file(state_key(job_id, name), output / name)
        except FileNotFoundError:
            continue
        if Path(got) != output / name:  # the store's own file: the trainer must append to a copy
            shutil.copyfile(got, output / name)
    return [step for step, _ in list_checkpoints(output)]


def fetch_parent(storage: Storage, start: parents.Start | None, dirs: RunDirs) -> parents.Start | None:
    """The checkpoint the job continues from, on local disk (parent/)."""
    return None if start is None else parents.materialize(storage, start, dirs.parent)


@dataclass(frozen=True)
class ReferenceTables:
    """A run's file of precomputed reference log-probs (dpo_core.refcache) and where its team keeps it."""

    team_id: str
    key: str
    path: Path
    fetched: tuple | None  # the file as the team's cache gave it (its stat), None when the team had none

    def computed(self) -> bool:
        """Whether the run wrote the file: the team had none, or the run replaced one it could not use."""
        return self.path.is_file() and _stat(self.path) != self.fetched


def fetch_reference_tables(storage: Storage, team_id: str, spec: TrainingSpec, dirs: RunDirs,
                           max_bytes: int) -> tuple[TrainingSpec, ReferenceTables | None]:
    """The spec pointed at a directory of the scratch disk holding the team's tables for it, if the team
    has them (the run writes them there otherwise). Unchanged without reference_mode: precomputed, or with
    a cache of 0 bytes. A cache that cannot be read leaves the run without one: it never fails the job."""
    from dpo_core import refcache

    if max_bytes <= 0 or spec.reference_mode != "precomputed" or not spec.loss.needs_reference:
        return spec, None
    directory = dirs.root / "reference-cache"
    try:
        key = refcache.cache_key(spec)
        path = directory / f"{key}.pt"
        directory.mkdir(parents=True, exist_ok=True)
        fetched = _stat(path) if reference_cache.fetch(storage, team_id, key, path) else None
    except (OSError, ValueError) as err:
        log.warning("team %s: its reference log-prob cache cannot be read (%s); the run computes them", team_id, err)
        return spec, None
    return spec.model_copy(update={"reference_cache": str(directory)}), ReferenceTables(team_id, key, path, fetched)


def _stat(path: Path) -> tuple:
    info = os.stat(path)
    return info.st_ino, info.st_size, info.st_mtime_ns
