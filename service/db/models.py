"""SQLAlchemy models of the job store: teams and their keys, files, jobs and their runs, events,
checkpoints, workers, webhooks and their deliveries.

The schema is made only by the Alembic migrations in migrations/; keep the two in step.
Times are Unix seconds (the OpenAI API's convention); the ones GPU-seconds are computed from
(a run's start and end, worker heartbeats) keep their fraction.
"""
from __future__ import annotations

import re
import secrets
import time
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, func, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
BigIntKey = BigInteger().with_variant(Integer, "sqlite")


class JobStatus(StrEnum):
    # A job is created `queued`: its files and spec are checked before the request returns, so OpenAI's
    # `validating_files` never applies.
    QUEUED = "queued"  # waiting for the dispatcher
    DISPATCHED = "dispatched"  # given to one worker (jobs.worker_id), its id sent to that worker's queue
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Stopped by its team (POST .../pause) with its worker freed, until resumed: a running job checkpoints at
    # its next step first (service.db.leases.hand_back), and a resumed one goes on from that checkpoint.
    PAUSED = "paused"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
WAITING = (JobStatus.QUEUED, JobStatus.DISPATCHED)  # what users see as queued
ON_WORKER = (JobStatus.DISPATCHED, JobStatus.RUNNING)  # what keeps a worker busy
# Every status users see (public_status of each stored one): the listing's filter, the dashboard's.
PUBLIC_STATUSES = tuple(s.value for s in JobStatus if s != JobStatus.DISPATCHED)


def public_status(status: str) -> str:
    """The status users see: `dispatched` is ours, and to them (and OpenAI's clients) a job handed to a
    worker but not started is still queued."""
    return JobStatus.QUEUED.value if status == JobStatus.DISPATCHED else status


def stored_statuses(public: str) -> tuple[str, ...]:
    """The stored statuses a status users see stands for (the inverse of public_status)."""
    return tuple(s.value for s in WAITING) if public == JobStatus.QUEUED else (public,)
DEFAULT_TEAM_ID = "team-default"  # made by the migration; the admin key's own files and jobs go here


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """`prefix-` + 12 hex digits of milliseconds + 12 random ones: ids sort in creation order."""
    return f"{prefix}-{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


_ID = re.compile(r"[a-z]+-[A-Za-z0-9]{1,64}")


def is_id(value: str, prefix: str) -> bool:
    """Whether `value` could be an id of this kind. Anything else (`../x`, NUL bytes, a megabyte of text)
    is unknown without asking the database."""
    return value.startswith(f"{prefix}-") and _ID.fullmatch(value) is not None


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON(none_as_null=True), list[Any]: JSON(none_as_null=True)}


class Team(Base):
    """A team sharing the pool: it owns files and jobs, has keys, and limits on its jobs (None: no limit)."""

    __tablename__ = "teams"
    __table_args__ = (
        Index("ix_teams_created_at_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("team"))
    name: Mapped[str] = mapped_column(String(128))
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    # Bytes of uploads, checkpoints and result files the team may keep; None: the service's default
    # (DPO_TEAM_STORAGE_BYTES), if any (service.db.quota).
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger)


# Names are unique, whatever their case, among teams that exist; a deleted team's name may be used again.
# (Names are ASCII, so SQLite's lower() and PostgreSQL's agree.)
Index("uq_teams_lower_name_live", func.lower(Team.name), unique=True, sqlite_where=text("deleted_at IS NULL"),
      postgresql_where=text("deleted_at IS NULL"))


class ApiKey(Base):
    """A team's key. Only its SHA-256 is stored: the key is 256 random bits, shown once at creation."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_team_id", "team_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("key"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hint: Mapped[str] = mapped_column(String(32))  # the key's first characters, to tell keys apart in lists
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class Worker(Base):
    """A worker process in the pool: what it serves, the queue it listens on, when it last said it is alive."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("worker"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    gpu_type: Mapped[str] = mapped_column(String(64))
    gpus: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(300))
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    registered_at: Mapped[float] = mapped_column(Float)
    last_heartbeat_at: Mapped[float] = mapped_column(Float)
    stopped_at: Mapped[float | None] = mapped_column(Float)
    # The trackers (training.report_to) the worker can import; None: a worker that did not say (unknown).
    integrations: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True))
    # Memory of one of its devices (one GPU; a CPU worker: its RAM); None: a worker that did not say.
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_created_at_id", "created_at", "id"),
        Index("ix_files_team_id_created_at_id", "team_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("file"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))
    rows: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), default="processed")
    storage_key: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    # What dpo_core's reader found in valid rows (DataWarning.as_dict() each), e.g. identical pairs.
    warnings: Mapped[list[Any]] = mapped_column(JSON(none_as_null=True), default=list, server_default=text("'[]'"))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_team_id_created_at_id", "team_id", "created_at", "id"),
        # The listing filtered by status (newest first), per team and for the admin; also any status lookup.
        Index("ix_jobs_team_id_status_created_at_id", "team_id", "status", "created_at", "id"),
        Index("ix_jobs_status_created_at_id", "status", "created_at", "id"),
        Index("uq_jobs_team_id_idempotency_key", "team_id", "idempotency_key", unique=True),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ftjob"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    status: Mapped[str] = mapped_column(String(32))
    # What the job asks of the pool, and how it ranks among its team's waiting jobs (higher first).
    priority: Mapped[int] = mapped_column(Integer, default=0)
    gpu_type: Mapped[str | None] = mapped_column(String(64))
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    model: Mapped[str] = mapped_column(String(1024))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    method: Mapped[dict[str, Any]]
    hyperparameters: Mapped[dict[str, Any]]
    # The request's `training` extension as given, and the validated TrainingSpec without server paths.
    training: Mapped[dict[str, Any] | None]
    spec: Mapped[dict[str, Any]]
    # The spec's report_to (a JSON list of tracker names), apart so the scheduler can match it to workers.
    report_to: Mapped[list[Any]] = mapped_column(JSON(none_as_null=True), default=list, server_default=text("'[]'"))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    suffix: Mapped[str | None] = mapped_column(String(64))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON(none_as_null=True))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set when the job's worker shuts down (SIGTERM): the run checkpoints at its next step and hands the job back.
    handback_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Set by POST .../pause on a running job: the run checkpoints at its next step and the job ends `paused`.
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    # Runs that started and did not end in a clean hand-back; at max_attempts a lost run fails the job.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, default=3, server_default=text("3"))
    # The lease on a running job (service.db.leases): the fencing token of the run that holds it, and
    # until when. Every write of a run names its token; a stale run's writes find another and are refused.
    lease_token: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    # Idempotency-Key of the request that created the job, unique per team, and a hash of that request.
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    worker_id: Mapped[str | None] = mapped_column(ForeignKey("workers.id", ondelete="SET NULL"), index=True)
    worker: Mapped[str | None] = mapped_column(String(255))  # the worker's name, kept after it leaves
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(64))
    result_files: Mapped[list[Any]] = mapped_column(JSON(none_as_null=True), default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    step: Mapped[int | None] = mapped_column(BigInteger)
    total_steps: Mapped[int | None] = mapped_column(BigInteger)
    epoch: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any] | None]
    eval_metrics: Mapped[dict[str, Any] | None]
    # The pre-flight estimate the job was created with (service.preflight), and what its run measured
    # (train seconds, tokens/s, peak memory, model size, precision, gpu type), which calibrates estimates.
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    measured: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    # The diagnostics its runs raised, {code, step, message} each (service.db.jobs.add_warning; the events
    # hold their evidence), and the step at which training.early_stopping ended its training.
    warnings: Mapped[list[Any] | None] = mapped_column(JSON(none_as_null=True))
    early_stopped_at_step: Mapped[int | None] = mapped_column(BigInteger)
    # The checkpoint the job starts from when its `model` names one (service.parents), and that checkpoint's
    # job; kept as ids, no foreign keys: either may be deleted once the job has ended.
    parent_checkpoint: Mapped[str | None] = mapped_column(String(64))
    parent_job: Mapped[str | None] = mapped_column(String(64))


class RunOutcome(StrEnum):
    """How a run ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    HANDED_BACK = "handed_back"  # its worker shut down, or its job was paused; it resumes from a checkpoint
    LOST = "lost"  # it stopped renewing its lease (its worker died, or lost the database)


class Run(Base):
    """One run of a job: from when a worker started it (service.db.leases.acquire) to when it ended
    (service.db.leases.end_run); `ended_at` None while it runs. A team's GPU-seconds are the sum over
    its runs of `gpus` x their length (service.db.usage), so time a job spends queued between runs never
    counts."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("uq_runs_job_id_token", "job_id", "token", unique=True),
        Index("ix_runs_team_id_started_at", "team_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    gpus: Mapped[int] = mapped_column(Integer)
    token: Mapped[int] = mapped_column(BigInteger)  # the run's lease token (Job.lease_token)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))  # the worker's name
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(String(32))  # a RunOutcome once ended


class Event(Base):
    """A job's event. `seq` orders events, and is one sequence across every job of every team; `id`, the
    public id and cursor, is random, so a team's event ids tell nothing of other teams' events."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_id_seq", "job_id", "seq"), Index("uq_events_id", "id", unique=True))

    seq: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), default=lambda: new_id("ftevent"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(16), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_id_step", "job_id", "step_number"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ftckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step_number: Mapped[int] = mapped_column(BigInteger)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict[str, Any] | None]
    storage_key: Mapped[str] = mapped_column(String(512))
    # Size of the directory when it was recorded, so a team's storage is a sum, not a disk walk.
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Sample(Base):
    """A job's completions of its fixed prompts at one step (training.samples): the reference's
    and the policy's, per prompt, with their lengths and rewards (dpo_core.samples)."""

    __tablename__ = "samples"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    records: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    summary: Mapped[dict[str, Any] | None]
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # not sent yet, or to be tried again at next_attempt_at
    DELIVERED = "delivered"  # an attempt got a 2xx
    FAILED = "failed"  # no attempt got a 2xx within the retry window (DPO_WEBHOOK_RETRY_WINDOW_S)


class Webhook(Base):
    """A team's endpoint for job events. The secret is kept as given (or generated): signing needs it."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_team_id_created_at_id", "team_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("wh"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[Any]] = mapped_column(JSON(none_as_null=True))
    secret: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class WebhookDelivery(Base):
    """One event for one webhook: the outbox row written in the transaction of the change it reports,
    and the record of every attempt to send it (service.webhook_delivery). `id` is the event's id, the
    same in every attempt (the `webhook-id` header receivers deduplicate on)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_id_created_at_id", "webhook_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("whevt"))
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]]  # the event as sent, fixed when the change happened
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING.value)
    # Each attempt: {at, status_code, error, response, duration_ms}, oldest first.
    attempts: Mapped[list[Any]] = mapped_column(JSON(none_as_null=True), default=list)
    # When it is due (None once delivered or failed). A sender claims a due row by moving this past the
    # attempt's longest duration and setting claim_token: a sender that dies mid-attempt leaves it due again.
    next_attempt_at: Mapped[float | None] = mapped_column(Float)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Preflight(Base):
    """A pre-flight report's estimate, kept so that a job created from the same request soon after
    carries it (matched by team and request hash)."""

    __tablename__ = "preflights"
    __table_args__ = (Index("ix_preflights_team_id_request_hash", "team_id", "request_hash", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("ftpre"))
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"))
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
