"""The service's settings: one pydantic-settings class read from DPO_* environment variables."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Redis re-delivers an unacknowledged task after its visibility timeout (default one hour). A job that
# trains for longer would then run twice; 48 hours is above any job we expect.
REDIS_VISIBILITY_TIMEOUT_S = 48 * 3600


class Settings(BaseSettings):
    """Every knob of the API and the worker. Paths are resolved to absolute ones at load time."""

    model_config = SettingsConfigDict(env_prefix="DPO_", extra="ignore")

    data_dir: Path = Field(Path(".dpo-data"), description="uploads, checkpoints, the embedded database")
    database_url: str | None = Field(None, description="default: SQLite file dpo.sqlite in data_dir")
    broker_url: str | None = Field(None, description="default: embedded SQLite broker in data_dir")
    api_key: SecretStr | None = Field(None, description="admin key; default: generated into data_dir")
    env: Literal["development", "test", "production"] = "development"
    queue: str = Field("dpo-jobs", description="Celery queue the jobs travel on")
    max_upload_bytes: int = Field(1 << 30, gt=0, description="largest accepted upload")
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

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.env == "production" and self.api_key is None:
            raise ValueError("DPO_ENV=production needs DPO_API_KEY set to a secret of your own")
        if self.worker_lost_after_s <= self.worker_heartbeat_interval_s:
            raise ValueError("DPO_WORKER_LOST_AFTER_S must be longer than DPO_WORKER_HEARTBEAT_INTERVAL_S")
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
    def models_dir(self) -> Path:
        return self.data_dir / "models"


def get_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (the CLI's flags) on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
