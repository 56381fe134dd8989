"""Unit: settings defaults, the admin key and the shared Celery configuration."""
from __future__ import annotations

import stat

import pytest
from pydantic import ValidationError

from api.queue import make_celery
from service.auth import ADMIN, admin_key, authenticate
from service.broker import REDIS_VISIBILITY_TIMEOUT_S
from service.settings import Settings
from worker.app import create_worker_app


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


STRONG = "k" * 16 + "3f9a0c7e1b2d4f6a8c0e2b4d6f8a1c3e"


@pytest.mark.parametrize("overrides, named", [
    ({"api_key": "changeme"}, "DPO_API_KEY"),
    ({"api_key": "test-admin-key"}, "DPO_API_KEY"),
    ({"api_key": "short-but-random-7f3a"}, "DPO_API_KEY"),
    ({"api_key": STRONG, "database_url": "postgresql+psycopg2://dpo:dpo@db/dpo"}, "DPO_DATABASE_URL"),
    ({"api_key": STRONG, "database_url": "postgresql+psycopg2://postgres:postgres@db/dpo"}, "DPO_DATABASE_URL"),
    ({"api_key": STRONG, "broker_url": "redis://:password@redis:6379/0"}, "DPO_BROKER_URL"),
    ({"api_key": STRONG, "metrics_token": "changeme"}, "DPO_METRICS_TOKEN"),
    ({"api_key": STRONG, "metrics_token": "short-but-random-7f3a"}, "DPO_METRICS_TOKEN"),
])
def test_production_refuses_default_secrets_without_showing_them(tmp_path, overrides, named):
    with pytest.raises(ValidationError) as err:
        Settings(data_dir=tmp_path, env="production", **overrides)
    text = str(err.value)
    assert named in text
    for secret in ("changeme", "test-admin-key", "short-but-random-7f3a", STRONG, ":dpo@", ":postgres@", ":password@"):
        assert secret not in text
    # Outside production the same values are fine (a laptop, the tests).
    Settings(data_dir=tmp_path, env="development", **overrides)


def test_production_accepts_secrets_of_its_own(tmp_path):
    s = Settings(data_dir=tmp_path, env="production", api_key=STRONG,
                 database_url="postgresql+psycopg2://dpo:Zq8-long-random@db/dpo", broker_url="redis://redis:6379/0")
    assert s.api_key.get_secret_value() == STRONG


@pytest.mark.parametrize("command", [["service.cli", "api"], ["service.cli", "worker"], ["worker"]])
def test_the_processes_refuse_to_start_on_a_default_secret(tmp_path, command):
    """`dpo-service api|worker` and the worker process itself (`python -m worker`)."""
    import os
    import subprocess
    import sys

    from tests.service.processes import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
    env.update(DPO_ENV="production", DPO_API_KEY="changeme", DPO_DATA_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "DPO_API_KEY is a well-known default" in out.stderr
    assert "changeme" not in out.stdout + out.stderr and not list(tmp_path.iterdir())


def test_model_dirs_default_to_the_data_dirs_models_and_take_a_path_list(tmp_path, monkeypatch):
    assert Settings(data_dir=tmp_path).model_dirs == [tmp_path.resolve() / "models"]
    monkeypatch.setenv("DPO_MODEL_DIRS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert Settings(data_dir=tmp_path).model_dirs == [tmp_path.resolve() / "a", tmp_path.resolve() / "b"]


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
    assert authenticate("k" * 1000, "k") is None and authenticate("", "k") is None


@pytest.mark.parametrize("make_app", [make_celery, lambda settings: create_worker_app(settings, "w-1")],
                         ids=["api", "worker"])
def test_celery_is_configured_for_long_gpu_jobs(tmp_path, make_app):
    """Both sides' apps take service.broker's configuration."""
    conf = make_app(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", queue="q")).conf
    assert not conf.task_acks_late  # acked on arrival: the database, not the broker, keeps jobs from being lost
    assert not conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_default_queue == "q"
    assert conf.broker_transport_options == {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    embedded = make_app(Settings(data_dir=tmp_path)).conf
    assert embedded.broker_url.startswith("sqla+sqlite:///")
    assert "visibility_timeout" not in embedded.broker_transport_options  # kombu would hand it to SQLAlchemy
