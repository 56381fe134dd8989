"""Helpers shared by the service tests (fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from pathlib import Path

import pytest

from service.settings import Settings

API_KEY = "test-admin-key"
# Where the tests' tiny models live (pytest's temporary directory); set by conftest.py for the session,
# and handed to every service the tests start as DPO_MODEL_DIRS.
MODEL_DIRS: list[str] = []


def make_settings(data_dir: Path, **overrides) -> Settings:
    # Explicit Nones: a developer's own DPO_DATABASE_URL / DPO_BROKER_URL must not leak into tests.
    # No dispatcher loop: in-process tests dispatch when they choose to (see `dispatch`); nor a webhook
    # delivery loop (tests send with service.webhook_delivery themselves), whose receivers are local;
    # nor an orphan sweep loop (tests sweep with service.sweep when they choose to).
    base = dict(data_dir=data_dir, api_key=API_KEY, database_url=None, broker_url=None,
                metrics_event_interval_s=0, cancel_poll_interval_s=0.2, dispatcher=False,
                webhook_delivery=False, sweep=False, webhook_allow_private=True, model_dirs=list(MODEL_DIRS))
    return Settings(**{**base, **overrides})


def store_settings(request, data_dir: Path, **overrides) -> Settings:
    """make_settings on the store a parametrized fixture names: "local" (the data directory), or else a
    prefix of its own on the SeaweedFS fixture (s3://bucket/<uuid>)."""
    if request.param == "local":
        return make_settings(data_dir, **overrides)
    server = request.getfixturevalue("s3_server")
    return make_settings(data_dir, storage_url=f"s3://{server.bucket}/{uuid.uuid4().hex}",
                         s3_endpoint_url=server.endpoint, **overrides)


_ENGINES: dict = {}


def _engine(url: str):
    from service.db.engine import make_engine

    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    return _ENGINES[url]


def dispose_engine(url: str) -> None:
    engine = _ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()


def sessions_for(settings: Settings):
    from service.db.engine import make_sessionmaker

    return make_sessionmaker(_engine(settings.db_url))


def register_worker(settings: Settings, name: str = "test-worker", gpu_type: str = "cpu", gpus: int = 1,
                    pid: int = 1, integrations: list[str] | None = None) -> str:
    """A worker row as a real worker would register it (no process behind it); returns its id.
    `integrations`: the trackers it says it can import (default: those this process can)."""
    from dpo_core.reporting import available
    from service.db.workers import register

    with sessions_for(settings).begin() as s:
        return register(s, name=name, gpu_type=gpu_type, gpus=gpus, queue_prefix=settings.queue,
                        hostname="test-host", pid=pid, lost_after_s=settings.worker_lost_after_s,
                        integrations=available() if integrations is None else integrations).id


def dispatch(settings: Settings, sent: list | None = None) -> list:
    """One scheduling pass that records what it would send instead of sending it."""
    from service.scheduler import dispatch_pass

    out = sent if sent is not None else []
    return dispatch_pass(sessions_for(settings), settings, out.append)


def run_on_worker(settings: Settings, job_id: str, worker: str = "test-worker") -> str:
    """Dispatch `job_id` to a (registered) test worker and run it here with that worker's JobRunner."""
    from worker.runner import JobRunner

    worker_id = register_worker(settings, worker)
    assignments = dispatch(settings)
    assert [a.job_id for a in assignments] == [job_id], assignments
    return JobRunner(settings, worker_id).run(job_id)


def upload(client, path: Path, purpose: str = "fine-tune", headers: dict | None = None) -> dict:
    with path.open("rb") as f:
        r = client.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def need(what: str, present: bool) -> None:
    """Skip a test that needs a program this machine lacks, unless DPO_TEST_REQUIRE_SERVICES=1 (then fail)."""
    if present:
        return
    if os.environ.get("DPO_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} not found, but DPO_TEST_REQUIRE_SERVICES=1 requires it")
    pytest.skip(f"{what} not found: install it to run this test")


def service_url(env_name: str) -> str:
    """A PostgreSQL / Redis URL from the environment; skip without it unless DPO_TEST_REQUIRE_SERVICES=1."""
    url = os.environ.get(env_name)
    if not url:
        if os.environ.get("DPO_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{env_name} is not set but DPO_TEST_REQUIRE_SERVICES=1 requires it")
        pytest.skip(f"set {env_name} to run the PostgreSQL + Redis tests")
    return url


@contextlib.contextmanager
def fresh_postgres(server_url: str | None = None):
    """A new database on PostgreSQL server `server_url` (default: the tests' DPO_TEST_DATABASE_URL),
    dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(server_url or service_url("DPO_TEST_DATABASE_URL"))
    name = f"dpo_test_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        dispose_engine(url)  # our pooled connections to it first
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_team(client, name: str, **limits) -> dict:
    """A team made through the admin API, with one key: {"id", "name", ..., "key", "key_id"}."""
    r = client.post("/v1/admin/teams", json={"name": name, **limits})
    assert r.status_code == 200, r.text
    team = r.json()
    r = client.post(f"/v1/admin/teams/{team['id']}/keys", json={"name": f"{name}-ci"})
    assert r.status_code == 200, r.text
    return {**team, "key": r.json()["key"], "key_id": r.json()["id"]}


def as_key(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}
