"""Integration: the Alembic migrations make exactly the schema the models describe, on SQLite and
on PostgreSQL, and running them again (or from several processes) is harmless."""
from __future__ import annotations

import re
import secrets
from concurrent.futures import ProcessPoolExecutor

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from api.store.db import make_engine
from api.store.migrate import alembic_config, upgrade
from tests.service.support import service_url

TABLES = {"alembic_version", "teams", "api_keys", "workers", "files", "jobs", "events", "checkpoints"}


def _check(url: str) -> None:
    upgrade(url)
    upgrade(url)  # idempotent
    engine = make_engine(url)
    with engine.connect() as conn:
        assert TABLES <= set(inspect(conn).get_table_names())
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.check(cfg)  # raises if the models and the migrations disagree
        command.downgrade(cfg, "base")
        conn.commit()
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade(url)


def test_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'dpo.sqlite'}"
    _check(url)
    with make_engine(url).connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_concurrent_start_ups_migrate_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'dpo.sqlite'}"
    with ProcessPoolExecutor(4) as pool:
        list(pool.map(upgrade, [url] * 4))
    with make_engine(url).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


@pytest.mark.postgres
def test_postgresql():
    base = make_url(service_url("DPO_TEST_DATABASE_URL"))
    name = f"dpo_test_{secrets.token_hex(4)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = base.set(database=name).render_as_string(hide_password=False)
        _check(url)
        with ProcessPoolExecutor(3) as pool:
            list(pool.map(upgrade, [url] * 3))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _rows_before_teams(url: str) -> None:
    """A file and a running job as the schema before teams (0001) holds them."""
    engine = make_engine(url)
    with engine.connect() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO files (id, filename, purpose, bytes, format, rows, status, storage_key, "
                          "created_at) VALUES ('file-old', 'a.jsonl', 'fine-tune', 1, 'text', 1, 'processed', "
                          "'files/file-old.jsonl', 100)"))
        conn.execute(text("INSERT INTO jobs (id, status, model, training_file, method, hyperparameters, spec, "
                          "created_at, started_at, cancel_requested, result_files) VALUES ('ftjob-old', 'running', "
                          "'m', 'file-old', '{}', '{}', '{}', 100, 160, false, '[]')"))
        conn.commit()
    engine.dispose()


def _check_existing_rows_join_the_default_team(url: str) -> None:
    _rows_before_teams(url)
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT team_id FROM files")).scalar() == "team-default"
        job = conn.execute(text("SELECT team_id, priority, gpus, gpu_type, started_at FROM jobs")).one()
        assert tuple(job) == ("team-default", 0, 1, None, 160.0)
        assert conn.execute(text("SELECT name FROM teams")).scalar() == "default"
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
        conn.commit()
        assert conn.execute(text("SELECT started_at FROM jobs")).scalar() == 160
    engine.dispose()


def test_existing_rows_join_the_default_team_sqlite(tmp_path):
    _check_existing_rows_join_the_default_team(f"sqlite:///{tmp_path / 'dpo.sqlite'}")


@pytest.mark.postgres
def test_existing_rows_join_the_default_team_postgresql():
    from tests.service.support import fresh_postgres

    with fresh_postgres() as url:
        _check_existing_rows_join_the_default_team(url)


def _check_existing_events_get_random_ids(url: str) -> None:
    """Events from before 0007 (ids were `ftevent-<seq>`) get random ids, unique, not their seq."""
    engine = make_engine(url)
    with engine.connect() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
        conn.execute(text("INSERT INTO jobs (id, team_id, status, model, training_file, method, hyperparameters, "
                          "spec, created_at, cancel_requested, result_files, priority, gpus) VALUES ('ftjob-old', "
                          "'team-default', 'queued', 'm', 'file-old', '{}', '{}', '{}', 100, false, '[]', 0, 1)"))
        for i in range(50):
            conn.execute(text("INSERT INTO events (job_id, created_at, level, type, message) "
                              "VALUES ('ftjob-old', 100, 'info', 'message', :m)"), {"m": f"event {i}"})
        conn.commit()
        command.upgrade(cfg, "head")
        conn.commit()
        rows = conn.execute(text("SELECT seq, id FROM events ORDER BY seq")).all()
        assert len(rows) == 50 and len({r.id for r in rows}) == 50
        for seq, event_id in rows:
            assert re.fullmatch(r"ftevent-[0-9a-f]{24}", event_id) and event_id != f"ftevent-{seq}"
        command.downgrade(cfg, "0003")
        conn.commit()
        assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 50
    engine.dispose()


def test_existing_events_get_random_ids_sqlite(tmp_path):
    _check_existing_events_get_random_ids(f"sqlite:///{tmp_path / 'dpo.sqlite'}")


@pytest.mark.postgres
def test_existing_events_get_random_ids_postgresql():
    from tests.service.support import fresh_postgres

    with fresh_postgres() as url:
        _check_existing_events_get_random_ids(url)
