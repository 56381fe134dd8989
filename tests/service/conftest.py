"""Fixtures for the service tests: settings in a temporary data directory, an in-process API client
and small synthetic data files."""
from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import Settings
from tests.service.support import API_KEY, make_settings


def pytest_configure(config):
    # Raised inside kombu's embedded-broker transport (see api/queue.py); not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy:DeprecationWarning")


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
