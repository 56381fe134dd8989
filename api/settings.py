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

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.env == "production" and self.api_key is None:
            raise ValueError("DPO_ENV=production needs DPO_API_KEY set to a secret of your own")
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
