"""Continuing from a checkpoint: a job's `model` may be the id of a checkpoint (`ftckpt-…`) or of a job
(`ftjob-…`: its final model, the `fine_tuned_model` checkpoint) of the caller's team, its parent.

The job keeps that id (its stored spec holds no server path); the API resolves it when it checks the
request, and the worker again when the job starts (`of_job`), then brings the checkpoints it names from
the store onto its own disk (`materialize`). A full-weight checkpoint is a model directory: the policy
loads it. A LoRA checkpoint is an adapter (a final model's is in `adapter/`): the job trains it further
on the base its job trained on, with the same LoRA settings. Either way the default reference is that
starting point, frozen. Another team's id gets the answer an unknown id gets.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.artifacts import Storage, key_parts
from service.auth import Principal
from service.db.models import Checkpoint, Job, JobStatus, is_id
from service.errors import InvalidInput, NotFound

PREFIXES = ("ftckpt-", "ftjob-")
ADAPTER_DIR = "adapter"  # where a LoRA job's final model keeps its adapter (dpo_core.trainer)


def names_parent(model: str) -> bool:
    """Whether a job's `model` names a checkpoint or a job rather than a model directory or hub id."""
    return model.startswith(PREFIXES)


class ParentGone(InvalidInput):
    """The checkpoint a job starts from (or one its own start needs) was deleted, or its files are gone."""

    code = "parent_checkpoint_deleted"


@dataclass(frozen=True)
class Start:
    """Where a job's policy starts. `model`: what it loads (a checkpoint directory, or the LoRA base);
    `adapter`: the LoRA adapter directory it trains further; `lora`: that adapter's settings.

    A directory in the store is named by its key (`model_key`, `adapter_key`); until `materialize` puts
    it on local disk, `model` and `adapter` hold that key, not a path."""

    checkpoint: str
    job: str
    model: str
    adapter: str | None
    lora: dict[str, Any] | None
    behind_model: tuple[str, ...]  # the checkpoints whose files `model` is (none: a model dir or hub id)
    model_key: str | None = None  # the store's directory `model` is, if it is one
    adapter_key: str | None = None  # the store's directory the adapter is in: a checkpoint, or a final model
    adapter_subdir: str | None = None  # where in adapter_key's directory the adapter is (ADAPTER_DIR)

    @property
    def needs(self) -> tuple[str, ...]:
        """Every checkpoint whose files the job reads when it starts (and again when it resumes)."""
        return (*self.behind_model, self.checkpoint) if self.adapter else self.behind_model


def find(session: Session, principal: Principal, model: str) -> Checkpoint:
    """The checkpoint `model` names: NotFound, worded alike, for an unknown id and another team's."""
    missing = NotFound(f"no checkpoint or fine-tuning job {model!r} to start from; list your jobs' checkpoints "
                       "with GET /v1/fine_tuning/jobs/{id}/checkpoints", param="model", code="model_not_found")
    if is_id(model, "ftjob"):
        job = session.get(Job, model)
        if job is None or not principal.may_see(job.team_id):
            raise missing
        ckpt = _final(session, job)
    else:
        ckpt = session.get(Checkpoint, model) if is_id(model, "ftckpt") else None
        job = session.get(Job, ckpt.job_id) if ckpt is not None else None
        if job is None or not principal.may_see(job.team_id):
            raise missing
    if job.team_id != principal.team_id:  # only the admin sees other teams' jobs
        raise InvalidInput(f"{model} belongs to team {job.team_id}; a job starts from a checkpoint of its own team "
                           f"({principal.team_id})", param="model", code="invalid_model")
    return ckpt


def _final(session: Session, job: Job) -> Checkpoint:
    if job.fine_tuned_model is None:
        raise InvalidInput(f"job {job.id} is {job.status} and has no final model; wait until it succeeds, or start "
                           "from one of its checkpoints (GET /v1/fine_tuning/jobs/{id}/checkpoints)",
                           param="model", code="parent_not_ready")
    ckpt = session.get(Checkpoint, job.fine_tuned_model)
    if ckpt is None:
        raise ParentGone(f"the final model of job {job.id} ({job.fine_tuned_model}) was deleted; start from another "
                         "checkpoint", param="model")
    return ckpt


def starting_point(session: Session, storage: Storage, ckpt: Checkpoint) -> Start:
    """Where a job that starts from `ckpt` starts, its files checked; ParentGone if any is missing.
    The store publishes a directory whole or not at all: one that is there is complete."""
    job = session.get(Job, ckpt.job_id)
    key = ckpt.storage_key
    if not storage.dir_exists(key):
        raise ParentGone(f"the files of checkpoint {ckpt.id} (job {job.id}, step {ckpt.step_number}) are gone "
                         "(removed by save_total_limit or by hand); start from another checkpoint", param="model")
    lora = job.spec.get("lora")
    if lora is None:
        return Start(ckpt.id, job.id, key, None, None, (ckpt.id,), model_key=key)
    base = base_model(session, storage, job)
    subdir = ADAPTER_DIR if ckpt.final else None
    return Start(ckpt.id, job.id, base.model, f"{key}/{subdir}" if subdir else key, lora, base.behind_model,
                 model_key=base.model_key, adapter_key=key, adapter_subdir=subdir)


def base_model(session: Session, storage: Storage, job: Job) -> Start:
    """Where a job's policy was loaded from (its LoRA base: `model`, `model_key`, `behind_model`)."""
    if job.parent_checkpoint is None:
        return Start("", job.id, job.model, None, None, ())
    parent = session.get(Checkpoint, job.parent_checkpoint)
    if parent is None:
        raise ParentGone(f"job {job.id} started from checkpoint {job.parent_checkpoint}, which was deleted: its "
                         "LoRA adapter has no base left to train on; start from another checkpoint", param="model")
    return starting_point(session, storage, parent)


def materialize(storage: Storage, start: Start, dest: Path, fetch: Callable[[str, Path], Path] | None = None
                ) -> Start:
    """`start` with the store's directories it names fetched under `dest` (model/, adapter/), and its
    `model` and `adapter` those local paths. `fetch(key, dest)`: how a directory is fetched (whole,
    by storage.fetch_dir, unless told otherwise)."""
    fetch = fetch or storage.fetch_dir
    model, adapter = start.model, start.adapter
    if start.model_key is not None:
        model = str(fetch(start.model_key, Path(dest) / "model"))
    if start.adapter_key is not None:
        fetched = fetch(start.adapter_key, Path(dest) / "adapter")
        adapter = str(fetched / start.adapter_subdir if start.adapter_subdir else fetched)
    return replace(start, model=model, adapter=adapter)


# What pre-flight reads of a checkpoint (configs, tokenizer files; of weights, only the safetensors headers
# dpo_core.estimate reads): the one rule of which members a partial fetch brings.
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npy", ".npz")


def preflight_part(name: str) -> str | None:
    """What pre-flight needs of the checkpoint file `name`: "whole", "header" (a .safetensors file's
    header: the shapes), or None (weights and optimizer state it never reads)."""
    if name.endswith(".safetensors"):
        return "header"
    return None if name.endswith(WEIGHTS) else "whole"


def materialize_for_preflight(storage: Storage, start: Start, dest: Path) -> Start:
    """`start` with what pre-flight reads of its directories on local disk: a local store's hard links
    (nothing copied); of an object store's tar (S3Storage.dir_manifest gives the members' offsets), only
    what preflight_part names, by byte ranges."""
    if not storage.remote:
        return materialize(storage, start, dest)
    return materialize(storage, start, dest, lambda key, to: _fetch_parts(storage, key, to))


def _fetch_parts(storage: Storage, key: str, dest: Path) -> Path:
    tar_key = f"{key}.tar"
    dest.mkdir(parents=True)
    for member in storage.dir_manifest(key)["files"]:
        if (part := preflight_part(member["name"])) is None:
            continue
        target = dest.joinpath(*key_parts(member["name"]))  # a name that climbs out of dest is refused
        target.parent.mkdir(parents=True, exist_ok=True)
        first, size = member["offset"], member["size"]
        if part == "header" and size >= 8:  # an 8-byte little-endian length, then that much JSON
            (length,) = struct.unpack("<Q", b"".join(storage.read_range(tar_key, first, first + 7)))
            size = min(8 + length, size)
        target.write_bytes(b"".join(storage.read_range(tar_key, first, first + size - 1)) if size else b"")
    return dest


def resolve(session: Session, principal: Principal, storage: Storage, model: str) -> Start:
    """A job request's `model` that names a checkpoint or a job, as where its policy starts."""
    return starting_point(session, storage, find(session, principal, model))


def of_job(session: Session, storage: Storage, job: Job) -> Start:
    """The worker's side: where a job with a parent starts, on this machine."""
    parent = session.get(Checkpoint, job.parent_checkpoint)
    if parent is None:
        raise ParentGone(f"checkpoint {job.parent_checkpoint}, which this job starts from, was deleted; submit the "
                         "job again from another checkpoint", param="model")
    return starting_point(session, storage, parent)


def users(session: Session, storage: Storage, ckpt: Checkpoint) -> list[str]:
    """The jobs not yet ended that read `ckpt`'s files when they start or resume."""
    live = [s.value for s in JobStatus if not s.terminal]
    found = []
    for job in session.scalars(select(Job).where(Job.parent_checkpoint.is_not(None), Job.status.in_(live))):
        try:
            needs = of_job(session, storage, job).needs
        except ParentGone:
            continue  # it fails when it starts, whatever is deleted now
        if ckpt.id in needs:
            found.append(job.id)
    return found
