"""Fixtures for the service tests: settings in a temporary data directory, an in-process API client
and small synthetic data files."""
from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from service.settings import Settings
from tests.service import support
from tests.service.support import API_KEY, fresh_postgres, make_settings, service_url


def pytest_configure(config):
    # Raised inside kombu's embedded-broker transport (see service/broker.py); not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy:DeprecationWarning")


@pytest.fixture(scope="session", autouse=True)
def model_dirs(tmp_path_factory) -> list[str]:
    """Jobs may use models from pytest's temporary directory, where the tiny test models are built."""
    support.MODEL_DIRS[:] = [str(tmp_path_factory.getbasetemp())]
    return support.MODEL_DIRS


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> tuple[Path, Path]:
    from dpo_core.toy import make_synthetic_task

    train, held_out = make_synthetic_task(tmp_path_factory.mktemp("service-task"), n_train=128, n_eval=32, seed=0)
    return Path(train), Path(held_out)


@pytest.fixture(scope="module")
def file_id(service, task_files) -> str:
    """The task's training file, uploaded to the test module's own `service` fixture (real processes)."""
    return service.upload(task_files[0])


@pytest.fixture(scope="module")
def postgres_url():
    """A fresh database on the test PostgreSQL server, dropped afterwards."""
    with fresh_postgres() as url:
        yield url


@pytest.fixture(scope="module")
def redis_env():
    """The test Redis, with a queue name of this run's own (so parallel runs never share messages)."""
    import redis

    url = service_url("DPO_TEST_BROKER_URL")
    queue = f"dpo-test-{secrets.token_hex(4)}"
    yield {"DPO_BROKER_URL": url, "DPO_QUEUE": queue}
    client = redis.Redis.from_url(url)
    leftovers = [queue, *client.scan_iter(match=f"*{queue}*")]
    client.delete(*leftovers)
