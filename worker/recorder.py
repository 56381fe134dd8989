"""JobRecorder: dpo_core callbacks that write a running job's progress into the job store.

Every write is its own short transaction (SQLite has one writer at a time) that first checks the run's
lease (worker.lease): a run that no longer owns its job writes nothing more, and stops at its next
step. While the database cannot answer, the writes are held and written later, in order (the lease
keeper's `write`): training goes on. Metrics events are throttled to one per
`metrics_event_interval_s`; the job row's progress to one write per second.

The run stops at a step boundary when the job is cancelled (no checkpoint), when its worker shuts
down or its team pauses it (a checkpoint first, so the job resumes there), or when it lost its lease
(nothing more written).

Checkpoints go to the store through the run's worker.publisher.Publisher: a checkpoint's row and its
`checkpoint_saved` event are written once it is whole in the store, and a pruned one's row goes once
it is gone from there. The publisher is drained when the run ends, however it ends.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from dpo_core.callbacks import Callbacks
from service.artifacts import Storage, job_key, make_storage
from service.db import jobs
from service.db.engine import is_unavailable
from service.db.leases import Lease
from service.db.models import Checkpoint, Job, JobStatus, new_id
from service.settings import Settings
from worker.lease import LeaseKeeper
from worker.publisher import CHECKPOINT, Publisher, Task

log = logging.getLogger("dpo.worker")
_CHECKPOINT_KEY = re.compile(r"/checkpoint-(\d+)$")

PROGRESS_INTERVAL_S = 1.0
SHOWN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate")
SHOWN_EVAL_METRICS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")

# Why a run stopped early (JobRecorder.stop_reason).
CANCEL, HANDBACK, PAUSE, LEASE_LOST = "cancel", "handback", "pause", "lease_lost"


class JobRecorder(Callbacks):
    def __init__(self, sessions: sessionmaker[Session], storage: Storage, keeper: LeaseKeeper,
                 metrics_interval_s: float, cancel_poll_s: float):
        self.sessions, self.storage, self.keeper = sessions, storage, keeper
        self.publisher: Publisher | None = None  # attach_publisher
        self.lease: Lease = keeper.lease
        self.job_id = self.lease.job_id
        self.metrics_interval_s, self.cancel_poll_s = metrics_interval_s, cancel_poll_s
        self.started = time.time()
        self.total_steps: int | None = None
        self.first_step = 0  # steps already done when this run started (a resumed job)
        self._last_event = self._last_progress = self._last_poll = float("-inf")
        self._pending: dict | None = None  # a metrics record not yet written as an event
        self.stop_reason: str | None = None
        self.handback = threading.Event()  # set by the job process's SIGTERM handler

    def on_start(self, info: dict[str, Any]) -> None:
        self.started, self.total_steps = time.time(), info.get("total_steps")
        self.first_step = info.get("resumed_from_step") or 0
        rows = f"{info.get('num_train_rows')} rows, {self.total_steps} steps"
        if info.get("micro_batch_size"):  # the memory plan (dpo_core.memplan)
            rows += (f", micro batch {info['micro_batch_size']}, {info.get('checkpointed_layers', 0)} of "
                     f"{info.get('layers')} layers checkpointed")
        message = f"Training started: {rows}"
        if info.get("resumed_from_step"):
            message = (f"Training resumed from checkpoint at step {self.first_step}: {rows} "
                       f"(attempt {self.lease.attempt})")

        # resumed_from is a path on the worker: the team sees the step it resumed from, never the path.
        shown = {k: v for k, v in _jsonable(info).items() if k != "resumed_from"}

        published = self._published() if info.get("resumed_from") else None

        def write(s: Session) -> None:
            jobs.update_job(s, self.job_id, total_steps=self.total_steps, step=self.first_step)
            if info.get("reference_cache") == "hit":  # the worker fetched them from the team's cache
                jobs.add_event(s, self.job_id, "Reference log-probs reused from the team's cache",
                               data={"code": "reference_cache_hit"})
            jobs.add_event(s, self.job_id, message, data={"code": "training_started", **shown})
            if published is not None:
                self._sync_checkpoints(s, published)
        self.keeper.write(write)

    def on_step(self, step: int, total_steps: int) -> None:
        if self.publisher is not None:
            self.publisher.poll()  # records the checkpoints whose upload is done
        now = time.monotonic()
        if now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        fields = dict(step=step, total_steps=total_steps, estimated_finish=self._eta(step, total_steps))
        self.keeper.write(lambda s: jobs.update_job(s, self.job_id, **fields))

    def on_log(self, metrics: dict[str, Any]) -> None:
        step, total = metrics.get("step"), metrics.get("total_steps") or self.total_steps
        fields = dict(metrics=metrics, step=step, total_steps=total, epoch=metrics.get("epoch"),
                      tokens_per_s=metrics.get("tokens_per_s"), trained_tokens=metrics.get("num_tokens"),
                      estimated_finish=self._eta(step, total))
        self._pending = metrics
        event = self._metrics_event() if time.monotonic() - self._last_event >= self.metrics_interval_s else None

        def write(s: Session) -> None:
            jobs.update_job(s, self.job_id, **fields)
            if event is not None:
                event(s)
        self.keeper.write(write)

    def on_eval(self, metrics: dict[str, Any]) -> None:
        shown = ", ".join(f"{k}={_fmt(metrics[k])}" for k in SHOWN_EVAL_METRICS if k in metrics)

        def write(s: Session) -> None:
            jobs.update_job(s, self.job_id, eval_metrics=metrics)
            jobs.add_event(s, self.job_id, f"Evaluation at step {metrics.get('step')}: {shown}",
                            type="metrics", data=metrics)
        self.keeper.write(write)

    def on_samples(self, step: int, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        who = "the reference's" if step == 0 else "the policy's"
        shown = f"mean length {_fmt(summary['samples/length'])} tokens ({who})"
        if "samples/win_rate" in summary:
            shown += f", win rate {_fmt(summary['samples/win_rate'])} against the reference"

        def write(s: Session) -> None:
            jobs.put_samples(s, self.job_id, step, records, summary)
            jobs.add_event(s, self.job_id, f"Samples at step {step}: {shown}", type="metrics", data=summary)
        self.keeper.write(write)

    def on_checkpoint(self, step: int, path: str) -> None:
        self.publisher.checkpoint(step, path, self._pending)

    def published(self, task: Task) -> None:
        """The publisher's word that a checkpoint is whole in the store (its row and event are written),
        or that a pruned one is gone from it (its row goes)."""
        if task.kind != CHECKPOINT:
            self.keeper.write(lambda s: s.execute(delete(Checkpoint).where(
                Checkpoint.job_id == self.job_id, Checkpoint.storage_key == task.key, ~Checkpoint.final)))
            return

        def write(s: Session) -> None:
            ckpt = jobs.add_checkpoint(s, self.job_id, task.step, task.key, task.metrics, size=task.size,
                                       id=task.checkpoint_id)
            s.flush()
            jobs.add_event(s, self.job_id, f"Checkpoint saved at step {task.step}",
                           data={"code": "checkpoint_saved", "checkpoint": ckpt.id, "step": task.step})
        self.keeper.write(write)

    def drain(self) -> None:
        """Return once every checkpoint of the run is in the store and recorded (OSError if one failed)."""
        if self.publisher is not None:
            self.publisher.drain()

    def close(self) -> None:
        """Stop publishing (what is not uploaded yet is dropped) and remove the staged files."""
        if self.publisher is not None:
            self.publisher.close()

    def on_warning(self, message: str, *, code: str | None = None, data: dict[str, Any] | None = None) -> None:
        self.keeper.write(lambda s: jobs.add_warning(s, self.job_id, message, code, data))

    def should_stop(self) -> bool:
        if self.stop_reason is None:
            self.stop_reason = self._why_stop()
        return self.stop_reason is not None

    def checkpoint_on_stop(self) -> bool:
        """A worker shutting down, or a pause, checkpoints first: the job resumes there. A cancel does not."""
        return self.stop_reason in (HANDBACK, PAUSE)

    def _why_stop(self) -> str | None:
        if self.keeper.lost:
            return LEASE_LOST
        if self.handback.is_set():
            return HANDBACK
        now = time.monotonic()
        if now - self._last_poll < self.cancel_poll_s:
            return None
        self._last_poll = now
        try:
            with self.sessions() as s:
                row = s.execute(select(Job.status, Job.lease_token, Job.cancel_requested, Job.handback_requested,
                                       Job.pause_requested).where(Job.id == self.job_id)).one_or_none()
        except Exception as err:
            if not is_unavailable(err):
                raise
            return None  # asked again at the next poll; the lease keeper says when the run is lost
        if row is None or row.status != JobStatus.RUNNING or row.lease_token != self.lease.token:
            return LEASE_LOST
        if row.cancel_requested:
            return CANCEL
        if row.pause_requested:
            return PAUSE
        return HANDBACK if row.handback_requested else None

    def on_end(self, result) -> None:
        """The run's last records: written before it ends (rank 0 of a multi-GPU job is a process of its
        own, which exits after this), however long the database takes to answer again."""
        self.flush()
        self.drain()
        if result.early_stopped_at_step is not None:
            self.keeper.write(lambda s: _early_stopped(s, self.job_id, result))
        self.keeper.drain()

    def on_error(self, error: Exception) -> None:
        self.drain_quietly()

    def drain_quietly(self) -> None:
        """A failed run still records the checkpoints it uploads; an upload that fails now is only logged
        (the run fails for its own reason)."""
        try:
            self.drain()
        except OSError as err:
            log.warning("job %s: a checkpoint's upload failed as the run ended: %s", self.job_id, err)

    def flush(self) -> None:
        """Write the last metrics record if throttling held it back."""
        if (event := self._metrics_event()) is not None:
            self.keeper.write(event)

    def _metrics_event(self) -> Callable[[Session], None] | None:
        """A write of the metrics record not yet written as an event (None if there is none)."""
        if self._pending is None:
            return None
        m, self._pending = self._pending, None
        self._last_event = time.monotonic()
        shown = ", ".join(f"{k}={_fmt(m[k])}" for k in SHOWN_METRICS if k in m)
        return lambda s: jobs.add_event(s, self.job_id, f"Step {m.get('step')}/{m.get('total_steps')}: {shown}",
                                         type="metrics", data=m)

    def _published(self) -> dict[str, tuple[int, int, str | None]]:
        """The job's checkpoints in the store: key -> (step, bytes, the id it was published under)."""
        found = {}
        for key in self.storage.list_dirs(job_key(self.job_id)):
            if not (match := _CHECKPOINT_KEY.search(key)):
                continue
            try:
                size = self.storage.size(key)
            except FileNotFoundError:
                continue  # pruned since the listing: as gone as one never listed
            found[key] = (int(match.group(1)), size, _published_id(self.storage, key))
        return found

    def _sync_checkpoints(self, s: Session, published: dict[str, tuple[int, int, str | None]]) -> None:
        """A resumed run: a row for every checkpoint an earlier run published, also one published just
        before its worker died and never recorded; forget rows whose directories are gone (pruned)."""
        known = set()
        for ckpt in s.scalars(select(Checkpoint).where(Checkpoint.job_id == self.job_id, ~Checkpoint.final)):
            if ckpt.storage_key in published:
                known.add(ckpt.storage_key)
            else:
                s.delete(ckpt)
        for key, (step, size, published_id) in sorted(published.items(), key=lambda kv: kv[1][0]):
            if key not in known and (published_id is None or s.get(Checkpoint, published_id) is None):
                jobs.add_checkpoint(s, self.job_id, step, key, None, size=size, id=published_id)

    def _eta(self, step: int | None, total: int | None) -> int | None:
        done = (step or 0) - self.first_step
        if done <= 0 or not total or step > total:
            return None
        elapsed = time.time() - self.started
        return int(time.time() + elapsed / done * (total - step))


def _early_stopped(s: Session, job_id: str, result) -> None:
    step, best = result.early_stopped_at_step, result.best_step
    jobs.update_job(s, job_id, early_stopped_at_step=step)
    jobs.add_event(s, job_id, f"Early stopping ended training at step {step}: no better evaluation since step "
                   f"{best}, whose weights are the final model", data={"code": "early_stopped", "step": step,
                                                                        "best_step": best})


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, str | int | float | bool | type(None)) else str(v) for k, v in info.items()}


def _published_id(storage: Storage, key: str) -> str | None:
    """The checkpoint id a directory was published under (its tar's arcname), where the store keeps one:
    an object store serves the directory's tar under that name only. None (a new id) for a local store,
    whose download names its tar when it is made."""
    if not storage.remote:
        return None
    arcname = getattr(storage, "dir_arcname", None)
    try:
        return arcname(key) if arcname is not None else storage._manifest(key)["arcname"]
    except FileNotFoundError:
        return None


def make_recorder(sessions: sessionmaker[Session], settings: Settings, keeper: LeaseKeeper,
                  storage: Storage | None = None) -> JobRecorder:
    return JobRecorder(sessions, storage or make_storage(settings), keeper, settings.metrics_event_interval_s,
                       settings.cancel_poll_interval_s)


def attach_publisher(recorder: JobRecorder, settings: Settings, output_dir: Path) -> Publisher:
    """The run's publisher, which records through `recorder`; staged files go next to `output_dir`
    (the run's scratch directory, worker.scratch)."""
    recorder.publisher = Publisher(recorder.storage, recorder.job_id, output_dir, Path(output_dir).parent / ".publish",
                                   recorder.published, lambda: new_id("ftckpt"),
                                   store_factory=functools.partial(make_storage, settings))
    return recorder.publisher


def recorder_for_job(settings: Settings, lease: Lease, output_dir: str) -> JobRecorder:
    """A JobRecorder built inside rank 0 of a multi-process job (dpo_core.launch): callbacks cannot cross
    the process boundary, so this process opens its own connection to the job store, renews the run's
    lease from a thread of its own as well, and publishes the checkpoints it writes."""
    from service.db.engine import make_engine, make_sessionmaker

    sessions = make_sessionmaker(make_engine(settings.db_url))
    keeper = LeaseKeeper(sessions, lease, settings.job_lease_s, settings.worker_heartbeat_interval_s)
    keeper.start()
    recorder = make_recorder(sessions, settings, keeper)
    attach_publisher(recorder, settings, Path(output_dir))
    return recorder
