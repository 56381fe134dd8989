"""What a run reads, brought from the store onto the worker's scratch disk (worker.scratch) before it
trains: the uploaded files, what earlier runs of the job published (its checkpoints, so that
`resume_from: auto` finds the latest, and the state the trainer goes on appending to), and the
checkpoint the job continues from.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from dpo_core.layout import METRICS_FILE, TENSORBOARD_DIR, TRACKING_FILE, list_checkpoints
from service import parents
from service.artifacts import Storage, job_key, state_key
from worker.scratch import RunDirs

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
