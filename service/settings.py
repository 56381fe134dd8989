"""The service's settings: one pydantic-settings class read from DPO_* environment variables."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

# With DPO_ENV=production the service refuses these as secrets (and any admin key shorter than this).
DEFAULT_SECRETS = frozenset({"changeme", "change-me", "changeit", "secret", "password", "admin", "test", "dpo",
                             "postgres", "default", "test-admin-key", "dpo-secret", "example"})
MIN_PRODUCTION_KEY_CHARS = 32


class Settings(BaseSettings):
    """Every knob of the API and the worker. Paths are resolved to absolute ones at load time."""

    # hide_input_in_errors: a settings error must never print the values, secrets among them.
    model_config = SettingsConfigDict(env_prefix="DPO_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(Path(".dpo-data"), description="uploads, checkpoints, the embedded database")
    database_url: str | None = Field(None, description="default: SQLite file dpo.sqlite in data_dir")
    broker_url: str | None = Field(None, description="default: embedded SQLite broker in data_dir")
    api_key: SecretStr | None = Field(None, description="admin key; default: generated into data_dir")
    metrics_token: SecretStr | None = Field(None, description="a Bearer token that may read GET /metrics and "
                                            "nothing else (the admin key may too); default: none")
    env: Literal["development", "test", "production"] = "development"
    queue: str = Field("dpo-jobs", description="Celery queue the jobs travel on")
    api_threads: int = Field(40, gt=0, description="threads serving sync routes in each API process; its "
                             "database pools match it (`dpo-service api --workers N` shares the default out)")
    max_upload_bytes: int = Field(1 << 30, gt=0, description="largest accepted upload")
    max_request_bytes: int = Field(1 << 20, gt=0, description="largest accepted request body other than an upload")
    max_line_bytes: int = Field(8 << 20, gt=0, description="longest accepted line of an uploaded JSONL file")
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="directories local models may come from (os.pathsep-separated); "
        "default: data_dir/models")
    metrics_event_interval_s: float = Field(5.0, ge=0, description="at most one metrics event per interval")
    cancel_poll_interval_s: float = Field(1.0, gt=0, description="how often a running job checks for cancel")
    # Scheduling (the dispatcher runs in every API process; the database keeps them from colliding).
    dispatcher: bool = Field(True, description="run the dispatcher loop in this API process")
    dispatch_interval_s: float = Field(1.0, gt=0, description="how often the dispatcher looks for free workers")
    fair_share_window_s: float = Field(24 * 3600.0, gt=0, description="GPU-seconds used over this window rank teams")
    # The pool: what a worker tells the service about itself, and when the service gives up on it.
    worker_name: str | None = Field(None, max_length=200, description="default: <hostname>-<pid>")
    worker_gpu_type: str | None = Field(None, max_length=64, description="default: detected (cpu without CUDA)")
    worker_gpus: int | None = Field(None, gt=0, description="default: CUDA devices visible, 1 on CPU")
    worker_heartbeat_interval_s: float = Field(5.0, gt=0, description="how often a worker says it is alive")
    worker_lost_after_s: float = Field(30.0, gt=0, description="a worker silent this long is lost")
    worker_forget_after_s: float = Field(24 * 3600.0, gt=0, description="lost or stopped workers leave the pool view")
    # Faults: who owns a running job, and what happens when its owner goes away.
    job_lease_s: float = Field(30.0, gt=0, description="a running job whose lease is not renewed this long is "
                               "taken back from its worker (renewed every worker_heartbeat_interval_s)")
    job_max_attempts: int = Field(3, ge=1, le=100, description="runs a job may lose to lost workers, by default")
    dispatch_timeout_s: float = Field(60.0, gt=0, description="a dispatched job its worker has not started this "
                                      "long is queued again (its message was lost)")

    # Live event streams (GET /v1/fine_tuning/jobs/{id}/events?stream=true).
    stream_heartbeat_s: float = Field(15.0, gt=0, description="an open event stream sends a keep-alive comment "
                                      "this often, so proxies and clients know it is alive")
    stream_poll_s: float = Field(0.25, gt=0, description="how often open event streams look for new events on "
                                 "SQLite (PostgreSQL notifies the API of each one instead)")

    # Storage: what a job keeps, and how much a team may keep (docs/operations.md, "Cleaning up").
    keep_checkpoints: int = Field(3, gt=0, description="checkpoints a job keeps unless its training.save_total_limit "
                                  "says otherwise: the latest N, plus the best by eval_loss, plus the final model")
    team_storage_bytes: int | None = Field(None, gt=0, description="bytes a team may store (uploads, checkpoints, "
                                           "result files) unless the admin set the team's own; default: no limit")

    reference_cache_team_bytes: int = Field(1 << 30, ge=0, description="bytes of precomputed reference log-probs "
                                            "a team's cache keeps (teams/<team>/reference-cache/), the most "
                                            "recently used first; 0: no cache")

    # Where artifacts live (service.artifacts.make_storage; docs/operations.md, "Storage").
    storage_url: str | None = Field(None, description="file:///path or s3://bucket/prefix; default: file:// the "
                                    "data directory. Credentials and region come from the standard AWS variables")
    s3_endpoint_url: str | None = Field(None, description="the S3 API's address for an S3-compatible server "
                                        "(SeaweedFS, MinIO); default: AWS's own")
    s3_public_endpoint_url: str | None = Field(None, description="the address presigned URLs name, when clients "
                                               "reach the store by another one than the service; default: "
                                               "s3_endpoint_url")
    storage_presign: bool = Field(True, description="with an object store, downloads redirect to a presigned URL "
                                  "instead of passing through the API")
    presign_ttl_s: int = Field(3600, gt=0, le=7 * 24 * 3600, description="how long a presigned URL is valid")
    worker_scratch_dir: Path | None = Field(None, description="the worker's local working directory: a job's "
                                            "inputs and checkpoints while it runs, emptied after each job; "
                                            "default: data_dir/scratch")
    upload_max_bytes_per_s: int | None = Field(None, gt=0, description="cap on a worker's checkpoint upload "
                                               "bandwidth; default: none")
    sweep_interval_s: float = Field(3600.0, gt=0, description="how often each API process removes stored objects "
                                    "no row names (the orphan sweep)")
    sweep_min_age_s: float = Field(3600.0, ge=0, description="the sweep leaves objects younger than this (an "
                                   "upload whose row is not written yet)")
    sweep: bool = Field(True, description="run the orphan sweep loop in this API process")

    # Webhooks (service.webhook_delivery): each API process runs a delivery loop unless told not to.
    webhook_delivery: bool = Field(True, description="run the webhook delivery loop in this API process")
    webhook_allow_private: bool = Field(False, description="let webhooks reach loopback, private, link-local and "
                                        "other non-global addresses (tests; a receiver on the service's own network)")
    webhook_timeout_s: float = Field(10.0, gt=0, description="the longest one delivery attempt may take")
    webhook_poll_interval_s: float = Field(1.0, gt=0, description="how often the delivery loop looks for due events")
    webhook_retry_base_s: float = Field(5.0, gt=0, description="the first retry's delay; each next one doubles, "
                                        "with jitter, up to webhook_retry_max_s")
    webhook_retry_max_s: float = Field(3600.0, gt=0, description="the longest delay between two attempts")
    webhook_retry_window_s: float = Field(24 * 3600.0, gt=0, description="an event not delivered this long after "
                                          "it happened is marked failed")
    webhook_concurrency: int = Field(8, gt=0, le=256, description="deliveries each API process sends at once")

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value):
        return [p for p in value.split(os.pathsep) if p.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        self.model_dirs = [p.expanduser().resolve() for p in self.model_dirs] or [(self.data_dir / "models").resolve()]
        self.worker_scratch_dir = (self.worker_scratch_dir or self.data_dir / "scratch").expanduser().resolve()
        if self.env == "production":
            _refuse_default_secrets(self)
        if self.worker_lost_after_s <= self.worker_heartbeat_interval_s:
            raise ValueError("DPO_WORKER_LOST_AFTER_S must be longer than DPO_WORKER_HEARTBEAT_INTERVAL_S")
        if self.job_lease_s <= self.worker_heartbeat_interval_s:
            raise ValueError("DPO_JOB_LEASE_S must be longer than DPO_WORKER_HEARTBEAT_INTERVAL_S (which renews it)")
        return self

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'dpo.sqlite'}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir

    @property
    def store_url(self) -> str:
        return self.storage_url or self.data_dir.as_uri()


def _refuse_default_secrets(settings: Settings) -> None:
    """Production runs only on secrets of the operator's own; the messages never show a secret."""
    problems = []
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    if key is None:
        problems.append("DPO_ENV=production needs DPO_API_KEY set to a secret of your own")
    elif key.strip().lower() in DEFAULT_SECRETS or len(key) < MIN_PRODUCTION_KEY_CHARS:
        problems.append(f"DPO_API_KEY is a well-known default or shorter than {MIN_PRODUCTION_KEY_CHARS} "
                        "characters; set a random one (e.g. openssl rand -hex 32)")
    token = settings.metrics_token.get_secret_value() if settings.metrics_token is not None else None
    if token is not None and (token.strip().lower() in DEFAULT_SECRETS or len(token) < MIN_PRODUCTION_KEY_CHARS):
        problems.append(f"DPO_METRICS_TOKEN is a well-known default or shorter than {MIN_PRODUCTION_KEY_CHARS} "
                        "characters; set a random one (e.g. openssl rand -hex 32)")
    for name, url in (("DPO_DATABASE_URL", settings.database_url), ("DPO_BROKER_URL", settings.broker_url)):
        password = _password(url)
        if password is not None and password.lower() in DEFAULT_SECRETS:
            problems.append(f"{name} uses a well-known default password; set one of your own")
    if problems:
        raise ValueError("; ".join(problems))


def _password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return make_url(url).password
    except Exception:  # noqa: BLE001 - not an SQLAlchemy-style URL (amqp://, ...): look no further
        return None


def get_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (the CLI's flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def settings_for_command(prog: str, **overrides) -> Settings | None:
    """get_settings for command `prog`; None after printing every problem to stderr (never a value)."""
    try:
        return get_settings(**overrides)
    except ValidationError as err:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        print(f"{prog}: invalid settings: {problems}", file=sys.stderr)
        return None
