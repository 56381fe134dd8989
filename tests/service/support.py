"""Helpers shared by the service tests (fixtures live in conftest.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from api.settings import Settings

API_KEY = "test-admin-key"


def make_settings(data_dir: Path, **overrides) -> Settings:
    # Explicit Nones: a developer's own DPO_DATABASE_URL / DPO_BROKER_URL must not leak into tests.
    base = dict(data_dir=data_dir, api_key=API_KEY, database_url=None, broker_url=None,
                metrics_event_interval_s=0, cancel_poll_interval_s=0.2)
    return Settings(**{**base, **overrides})


def upload(client, path: Path, purpose: str = "fine-tune") -> dict:
    with path.open("rb") as f:
        r = client.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose})
    assert r.status_code == 200, r.text
    return r.json()


def service_url(env_name: str) -> str:
    """A PostgreSQL / Redis URL from the environment; skip without it unless DPO_TEST_REQUIRE_SERVICES=1."""
    url = os.environ.get(env_name)
    if not url:
        if os.environ.get("DPO_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{env_name} is not set but DPO_TEST_REQUIRE_SERVICES=1 requires it")
        pytest.skip(f"set {env_name} to run the PostgreSQL + Redis tests")
    return url
