"""Run one training job on N local processes with PyTorch's elastic launcher (torchrun's machinery).

The launching process becomes the elastic agent: it starts the ranks, watches them, and if one
dies it stops the others and raises, so a failed rank never leaves processes behind. Callbacks
can't cross a process boundary, so they are named as "module:factory" and built inside rank 0.
"""
from __future__ import annotations

import importlib
import os
import socket
import uuid

from dpo_core.errors import RankFailedError, TrainingDiverged, TrainingError
from dpo_core.spec import TrainingSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_callbacks(factory: str | None, args: tuple):
    if not factory:
        return None
    module, _, name = factory.partition(":")
    return getattr(importlib.import_module(module), name)(*args)


def _record(fn):
    # Writes a rank's exception to the error file the agent reads, so the failure summary can name it.
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


@_record
def _rank_main(spec_data: dict, factory: str | None, args: tuple):
    from dpo_core import distributed
    from dpo_core.trainer import train

    spec = TrainingSpec.model_validate(spec_data)
    callbacks = _make_callbacks(factory, args) if os.environ.get("RANK", "0") == "0" else None
    try:
        return train(spec, callbacks)
    except TrainingDiverged as err:
        # Every rank raises it at the same step (dpo_core.divergence), so every rank ends cleanly with it;
        # launch() raises it again, and the run fails as diverged rather than as a failed rank.
        return err
    finally:
        distributed.shutdown(distributed.init(spec.device))


# What a rank raises inside a collective when another rank went away first (gloo, NCCL).
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "remote process exited")


def _failure_summary(err, nproc: int) -> str:
    """One line naming the rank that failed first and why.

    The launcher reports one failed rank: the first it finds dead when it polls. If a killed rank's
    peer has already died of the lost connection by then, the peer is the one reported, so a
    lost-peer failure names the rank it lost (the other one, with two ranks) as the cause.
    """
    failures = getattr(err, "failures", {}) or {}
    if not failures:
        return str(err).strip().splitlines()[0]
    rank, failure = min(failures.items(), key=lambda item: item[1].timestamp)
    reason = failure.message if isinstance(failure.message, str) else str(failure.message)
    lost = next((p for p in LOST_PEER if p in reason), None)
    if lost:
        others = [r for r in range(nproc) if r != rank]
        culprit = f"rank {others[0]}" if len(others) == 1 else "another rank"
        return f"{culprit} failed first: rank {rank} lost contact with it ({lost})"
    if failure.exitcode and failure.exitcode < 0:
        reason = f"killed by signal {-failure.exitcode}"
    return f"rank {rank} failed: {reason.strip().splitlines()[-1] if reason.strip() else 'exit ' + str(failure.exitcode)}"


def preflight(spec: TrainingSpec) -> None:
    """Fail here, with the precise error, on what would otherwise fail every rank: bad data, a missing model."""
    from dpo_core.data import read_jsonl
    from dpo_core.tokenizer_loading import load_tokenizer

    for path in filter(None, (spec.train_file, spec.validation_file)):
        read_jsonl(path)
    load_tokenizer(spec.model)


def launch(spec: TrainingSpec, nproc: int, callbacks_factory: str | None = None, factory_args: tuple = ()):
    """Train `spec` on `nproc` processes (NCCL on GPUs, gloo on CPU); returns rank 0's TrainResult."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise TrainingError("--nproc must be at least 1")
    preflight(spec)
    if spec.distributed is None and nproc > 1:
        spec = spec.model_copy(update={"distributed": "ddp"})
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"dpo-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,  # a dead rank fails the job; resuming is the caller's decision (resume_from)
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, _rank_main)(spec.model_dump(), callbacks_factory, factory_args)
    except ChildFailedError as err:
        raise RankFailedError(f"distributed training failed: {_failure_summary(err, nproc)}") from None
    if isinstance(results[0], TrainingDiverged):
        raise TrainingDiverged(str(results[0]))
    return results[0]
