"""Unit: settings defaults, the admin key and the shared Celery configuration."""
from __future__ import annotations

import stat

import pytest
from pydantic import ValidationError

from api.auth import ADMIN, admin_key, authenticate
from api.queue import make_celery
from api.settings import REDIS_VISIBILITY_TIMEOUT_S, Settings


def test_defaults_put_everything_in_the_data_dir(tmp_path, monkeypatch):
    for name in ("DPO_DATABASE_URL", "DPO_BROKER_URL", "DPO_API_KEY", "DPO_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.data_dir == tmp_path / ".dpo-data"
    assert s.db_url == f"sqlite:///{tmp_path}/.dpo-data/dpo.sqlite"
    assert s.broker == f"sqla+sqlite:///{tmp_path}/.dpo-data/broker.sqlite"


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("DPO_DATABASE_URL", "postgresql+psycopg2://u@h/db")
    monkeypatch.setenv("DPO_BROKER_URL", "redis://h:6379/3")
    s = Settings()
    assert (s.data_dir, s.db_url, s.broker) == (tmp_path / "d", "postgresql+psycopg2://u@h/db", "redis://h:6379/3")


def test_production_refuses_to_start_without_a_key(monkeypatch):
    monkeypatch.delenv("DPO_API_KEY", raising=False)
    with pytest.raises(ValidationError, match="DPO_API_KEY"):
        Settings(env="production")


def test_admin_key_is_generated_once_and_kept_private(tmp_path):
    s = Settings(data_dir=tmp_path, api_key=None)
    key, created = admin_key(s)
    assert created and len(key) > 30
    assert admin_key(s) == (key, False)
    assert stat.S_IMODE((tmp_path / "api_key").stat().st_mode) == 0o600
    assert admin_key(Settings(data_dir=tmp_path, api_key="mine")) == ("mine", False)


def test_authenticate():
    assert authenticate("k", "k") == ADMIN
    assert authenticate("x", "k") is None


def test_celery_is_configured_for_long_gpu_jobs(tmp_path):
    conf = make_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", queue="q")).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_default_queue == "q"
    assert conf.broker_transport_options == {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    embedded = make_celery(Settings(data_dir=tmp_path)).conf
    assert embedded.broker_url.startswith("sqla+sqlite:///")
    assert "visibility_timeout" not in embedded.broker_transport_options  # kombu would hand it to SQLAlchemy
