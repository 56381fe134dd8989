"""The pre-flight report of a job request: what its data looks like to the model, what the run will cost
on each GPU type of the pool, and when it would start. Nothing is queued; the estimate is kept (a
`preflights` row) so that a job created from the same request soon after carries it.

The data is tokenized as the trainer will (dpo_core.preflight, with the trainer's own tokenizer loader,
which needs no torch); the estimate is dpo_core.estimate's, calibrated by the throughput workers measured
on earlier jobs (jobs.measured); the start time comes from service.queue_forecast.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dpo_core import estimate as est
from dpo_core import memplan
from dpo_core.data import DataError
from dpo_core.errors import ModelLoadError, TrainingError
from dpo_core.preflight import data_report
from dpo_core.spec import TrainingSpec
from dpo_core.tokenizer_loading import load_tokenizer
from service import parents, submit
from service.artifacts import Storage
from service.auth import Principal
from service.db.models import Job, JobStatus, Preflight, new_id, now
from service.errors import InvalidInput, StorageFailed
from service.queue_forecast import forecast, serving_workers
from service.requests import JobCreate
from service.settings import Settings

CPU = "cpu"
# Past runs read to calibrate an estimate: the latest this many measured ones.
CALIBRATION_RUNS = 200


def preflight(session: Session, principal: Principal, req: JobCreate, settings: Settings,
              storage: Storage) -> dict[str, Any]:
    """The report of `req` (validated exactly as job creation validates it), stored as a `preflights` row."""
    at = time.time()
    job, built = submit.validate(req, session, storage, settings, principal)
    with _local_inputs(session, storage, job, built.spec) as spec:
        data = _data(spec)
        estimate = _estimate(session, principal, settings, spec, data, job, at)
    queue = forecast(session, settings, job, _chosen(estimate), at)
    report = {"object": "fine_tuning.preflight", "id": new_id("ftpre"), "created_at": now(), "model": req.model,
              "data": {"training_file": data["training_file"], "validation_file": data["validation_file"]},
              "warnings": data["warnings"], "estimate": estimate, "queue": queue}
    session.add(Preflight(id=report["id"], team_id=principal.team_id, request_hash=submit.request_hash(req),
                          created_at=report["created_at"], estimate=job_estimate(report)))
    session.commit()
    return report


def job_estimate(report: dict[str, Any]) -> dict[str, Any]:
    """What a job created from this report keeps of it (JobPublic.estimate)."""
    chosen = _chosen(report["estimate"]) or {}
    return {"preflight_id": report["id"], "gpu_type": chosen.get("gpu_type"), "seconds": chosen.get("seconds"),
            "peak_memory_bytes": chosen.get("peak_memory_bytes", report["estimate"]["memory"]["total"]),
            "steps": report["estimate"]["steps"], "tokens": report["estimate"]["tokens"]}


@contextmanager
def _local_inputs(session: Session, storage: Storage, job: Job, spec: TrainingSpec) -> Iterator[TrainingSpec]:
    """The spec with what it reads on this machine: its data files, and the checkpoint it starts from
    (service.parents) if any. A local store's own files (nothing is copied); a remote store's downloaded
    into a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dpo-preflight-") as tmp:
        local = _fetch_data(storage, spec, Path(tmp))
        if job.parent_checkpoint is not None:
            local |= _fetch_start(session, storage, job, Path(tmp) / "parent")
        yield spec.model_copy(update=local)


def _fetch_data(storage: Storage, spec: TrainingSpec, tmp: Path) -> dict[str, str]:
    keys = {"train_file": spec.train_file, "validation_file": spec.validation_file}
    try:
        return {field: str(storage.fetch_file(key, tmp / f"{field}.jsonl")) for field, key in keys.items() if key}
    except FileNotFoundError:
        raise InvalidInput("the bytes of the job's training or validation file are gone from storage; upload it "
                           "again", param="training_file", code="invalid_file") from None
    except OSError as err:
        raise StorageFailed(f"could not read the job's data from storage: {err.strerror or err}; try again later",
                            param="training_file") from None


def _fetch_start(session: Session, storage: Storage, job: Job, dest: Path) -> dict[str, str | None]:
    """The model (and LoRA adapter) of the checkpoint the job starts from, fetched under `dest`."""
    try:
        start = parents.materialize_for_preflight(storage, parents.of_job(session, storage, job), dest)
    except FileNotFoundError:
        raise parents.ParentGone(f"the files of checkpoint {job.parent_checkpoint}, which the job starts from, are "
                                 "gone; start from another checkpoint", param="model") from None
    except OSError as err:
        raise StorageFailed(f"could not read checkpoint {job.parent_checkpoint} from storage: "
                            f"{err.strerror or err}; try again later", param="model") from None
    return {"model": start.model, "adapter": start.adapter}


def _data(spec: TrainingSpec) -> dict[str, Any]:
    try:
        # A job that continues a LoRA checkpoint reads the tokenizer saved with its adapter, as the trainer does.
        source = spec.tokenizer_source
        return data_report(spec, _tokenizer(source, _stamp(source)))
    except ModelLoadError as err:
        raise InvalidInput(str(err), param="model", code="invalid_model") from None
    except DataError as err:
        raise InvalidInput(str(err), param="training_file", code="invalid_file") from None
    except TrainingError as err:
        raise InvalidInput(str(err), param="training_file", code=err.code or "invalid_file") from None


def _stamp(model: str) -> float:
    """When the model directory's tokenizer last changed (0 for a hub id): a new one is loaded again."""
    files = [Path(model) / name for name in ("tokenizer.json", "tokenizer_config.json")]
    return max((os.stat(f).st_mtime for f in files if f.is_file()), default=0.0)


@lru_cache(maxsize=8)
def _tokenizer(model: str, _stamp: float):
    return load_tokenizer(model)


def _estimate(session: Session, principal: Principal, settings: Settings, spec: TrainingSpec,
              data: dict[str, Any], job: Job, at: float) -> dict[str, Any]:
    try:
        facts = est.model_facts(spec.model)
    except est.EstimateError as err:
        raise InvalidInput(f"model: {err}", param="model", code="invalid_model") from None
    runs = _measured(session)
    types = [_on_type(spec, facts, data, shape, runs, principal, job.gpus)
             for shape in _pool(session, settings, job, at)]
    # The plan and memory of the run on the GPU type it would most likely get (a GPU when the pool has none).
    likely = _chosen({"by_gpu_type": types})
    device = CPU if (likely["gpu_type"] if likely else job.gpu_type) == CPU else "cuda"
    planned = likely["plan"] if likely and likely["plan"] else None
    layers = planned["checkpointed_layers"] if planned else None
    plan = est.training_plan(spec, facts, data, layers)
    if planned:  # the plan's own bytes, term by term
        w = memplan.workload_of_report(spec, data, device)
        memory = est.micro_batch_memory(spec, facts, device, planned["micro_batch_size"] * w.tokens_per_row,
                                        w.completion_share, layers, job.gpus, w.width)
    else:
        memory = est.memory(spec, facts, data, device, gpus=job.gpus)
    return {**{k: v for k, v in plan.items() if k != "precision"},
            "memory": {"micro_batch_size": planned["micro_batch_size"] if planned else spec.micro_batch,
                       "checkpointed_layers": layers if planned else est.checkpointed_layers(spec, facts),
                       "layers": facts.layers, "planned": planned is not None,
                       "precision": spec.precision, "device": device,
                       "breakdown": {k: v for k, v in memory.items() if k != "total"}, "total": memory["total"]},
            "by_gpu_type": types}


def _pool(session: Session, settings: Settings, job: Job, at: float) -> list[dict[str, Any]]:
    """The GPU types of the live workers that could run the job: how many workers, GPUs each, memory per device."""
    shapes: dict[str, dict[str, Any]] = {}
    for w in serving_workers(session, settings, job, at):
        shape = shapes.setdefault(w.gpu_type, {"gpu_type": w.gpu_type, "workers": 0, "gpus": w.gpus,
                                               "memory_bytes": w.memory_bytes})
        shape["workers"] += 1
        shape["gpus"] = max(shape["gpus"], w.gpus)
        if w.memory_bytes is not None:
            shape["memory_bytes"] = min(shape["memory_bytes"] or w.memory_bytes, w.memory_bytes)
    return sorted(shapes.values(), key=lambda s: s["gpu_type"])


def _measured(session: Session) -> list[tuple[str, str, dict[str, Any]]]:
    """(job id, team id, measured) of the latest measured runs."""
    rows = session.execute(select(Job.id, Job.team_id, Job.measured).where(
        Job.measured.is_not(None), Job.status == JobStatus.SUCCEEDED.value)
        .order_by(Job.finished_at.desc()).limit(CALIBRATION_RUNS)).all()
    return [(r.id, r.team_id, r.measured) for r in rows if isinstance(r.measured, dict)]


def _on_type(spec: TrainingSpec, facts, data: dict[str, Any], shape: dict[str, Any], runs: list,
             principal: Principal, gpus: int) -> dict[str, Any]:
    """The estimate on one GPU type: the memory plan the trainer would make for its device's memory (the micro
    batch, the checkpointed layers, their peak and recompute FLOPs), the largest micro batch that fits, time
    and its basis. A type whose memory is not reported gets no plan: its peak is the spec's own settings'."""
    gpu_type = shape["gpu_type"]
    device = CPU if gpu_type == CPU else "cuda"
    capacity = shape["memory_bytes"]
    plan, note = _memory_plan(spec, facts, data, device, capacity, gpus)
    layers = plan["checkpointed_layers"] if plan else None
    work = est.training_plan(spec, facts, data, layers)
    peak = plan["predicted_bytes"] if plan else est.memory(spec, facts, data, device, gpus=gpus)["total"]
    timing = est.seconds(work, [dict(m, job_id=job_id) for job_id, _, m in runs], device, gpu_type, gpus)
    teams = {job_id: team for job_id, team, _ in runs}
    mine = [j for j in timing["calibrated_by"] if principal.is_admin or teams.get(j) == principal.team_id]
    return {**shape, "peak_memory_bytes": peak,
            "fits": None if capacity is None else plan is not None and peak <= capacity,
            "largest_micro_batch_size": None if capacity is None else est.largest_micro_batch(
                spec, facts, data, device, memplan.budget_bytes(spec, capacity), gpus, layers),
            "plan": plan, "plan_note": note,
            "seconds": round(timing["seconds"], 3), "basis": timing["basis"], "calibrated_by": mine,
            "other_jobs": len(timing["calibrated_by"]) - len(mine), "mfu": timing["mfu"],
            "flops_per_s": timing["flops_per_s"]}


def _memory_plan(spec: TrainingSpec, facts, data: dict[str, Any], device: str, capacity: int | None,
                 gpus: int) -> tuple[dict[str, Any] | None, str | None]:
    """(the trainer's memory plan on a device of `capacity` bytes, or None; why there is none)."""
    if capacity is None and spec.max_memory is None:
        return None, "the device's memory is not reported: no plan; the peak is at the spec's own settings"
    budget = memplan.budget_bytes(spec, capacity or 0)
    try:
        plan = memplan.plan(spec, facts, device, budget, memplan.workload_of_report(spec, data, device), gpus)
    except TrainingError as err:
        return None, str(err)
    recompute = est.training_plan(spec, facts, data, plan.checkpointed_layers)["flops"]["recompute"]
    return {"micro_batch_size": plan.micro_batch, "checkpointed_layers": plan.checkpointed_layers,
            "layers": plan.layers, "predicted_bytes": plan.predicted_bytes, "budget_bytes": plan.budget_bytes,
            "recompute_flops": recompute}, None


def _chosen(estimate: dict[str, Any]) -> dict[str, Any] | None:
    """The GPU type the job would most likely run on: the fastest one it fits (or the fastest)."""
    types = estimate["by_gpu_type"]
    fitting = [t for t in types if t["fits"] is not False] or types
    return min(fitting, key=lambda t: t["seconds"]) if fitting else None
