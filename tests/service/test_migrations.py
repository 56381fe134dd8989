"""Integration: the Alembic migrations make exactly the schema the models describe, on SQLite and
on PostgreSQL, and running them again (or from several processes) is harmless."""
from __future__ import annotations

import json
import re
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from service.db.engine import make_engine
from service.db.migrate import alembic_config, upgrade
from tests.service.support import fresh_postgres

TABLES = {"alembic_version", "teams", "api_keys", "workers", "files", "jobs", "events", "checkpoints", "runs",
          "webhooks", "webhook_deliveries"}


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
    with fresh_postgres() as url:
        _check(url)
        with ProcessPoolExecutor(3) as pool:
            list(pool.map(upgrade, [url] * 3))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """An empty database of each kind the service runs on."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dpo.sqlite'}"
        return
    with fresh_postgres() as url:
        yield url


@contextmanager
def migrated(url: str, revision: str):
    """A connection to `url` with the schema at `revision`, and the Alembic config that moves it on."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
            yield conn, cfg
    finally:
        engine.dispose()


def test_existing_rows_join_the_default_team(database_url):
    """A file and a running job as the schema before teams (0001) holds them."""
    with migrated(database_url, "0001") as (conn, cfg):
        conn.execute(text("INSERT INTO files (id, filename, purpose, bytes, format, rows, status, storage_key, "
                          "created_at) VALUES ('file-old', 'a.jsonl', 'fine-tune', 1, 'text', 1, 'processed', "
                          "'files/file-old.jsonl', 100)"))
        conn.execute(text("INSERT INTO jobs (id, status, model, training_file, method, hyperparameters, spec, "
                          "created_at, started_at, cancel_requested, result_files) VALUES ('ftjob-old', 'running', "
                          "'m', 'file-old', '{}', '{}', '{}', 100, 160, false, '[]')"))
        conn.commit()
        command.upgrade(cfg, "head")
        conn.commit()
        assert conn.execute(text("SELECT team_id FROM files")).scalar() == "team-default"
        job = conn.execute(text("SELECT team_id, priority, gpus, gpu_type, started_at FROM jobs")).one()
        assert tuple(job) == ("team-default", 0, 1, None, 160.0)
        assert conn.execute(text("SELECT name FROM teams")).scalar() == "default"
        command.downgrade(cfg, "0001")
        conn.commit()
        assert conn.execute(text("SELECT started_at FROM jobs")).scalar() == 160


def _rows_at_0003(conn) -> None:
    """Teams whose names differ only in case, and jobs in every state a run leaves, as 0003 holds them."""
    for team_id, name, created, deleted in (("team-a", "Research", 10, None), ("team-b", "research", 20, None),
                                            ("team-c", "RESEARCH", 30, 35), ("team-d", "vision", 40, None)):
        conn.execute(text("INSERT INTO teams (id, name, created_at, deleted_at) VALUES (:i, :n, :c, :d)"),
                     {"i": team_id, "n": name, "c": created, "d": deleted})
    conn.execute(text("INSERT INTO files (id, team_id, filename, purpose, bytes, format, rows, status, "
                      "storage_key, created_at) VALUES ('file-x', 'team-a', 'a.jsonl', 'fine-tune', 1, 'text', "
                      "1, 'processed', 'files/file-x.jsonl', 100)"))
    for job_id, status, started, finished, token, attempts, gpus in (
            ("ftjob-run", "running", 100.5, None, 2, 2, 4), ("ftjob-done", "succeeded", 100.0, 160.25, 1, 1, 1),
            ("ftjob-again", "queued", 100.0, None, 1, 1, 1), ("ftjob-never", "cancelled", None, 120.0, 0, 0, 1)):
        conn.execute(text(
            "INSERT INTO jobs (id, team_id, status, priority, gpus, model, training_file, method, hyperparameters, "
            "spec, created_at, started_at, finished_at, cancel_requested, result_files, lease_token, attempts, "
            "worker) VALUES (:i, 'team-a', :s, 0, :g, 'm', 'file-x', '{}', '{}', '{}', 90, :st, :f, false, '[]', "
            ":t, :a, 'w1')"), {"i": job_id, "s": status, "st": started, "f": finished, "t": token, "a": attempts,
                               "g": gpus})
    conn.commit()


def test_upgrade_from_0003_makes_runs_and_parts_team_names(database_url):
    with migrated(database_url, "0003") as (conn, cfg):
        _rows_at_0003(conn)
        command.upgrade(cfg, "head")
        conn.commit()
        runs = conn.execute(text("SELECT job_id, team_id, gpus, token, attempt, worker, started_at, ended_at, outcome "
                                 "FROM runs ORDER BY job_id")).all()
        assert [tuple(r) for r in runs] == [("ftjob-done", "team-a", 1, 1, 1, "w1", 100.0, 160.25, "succeeded"),
                                            ("ftjob-run", "team-a", 4, 2, 2, "w1", 100.5, None, None)]
        names = dict(conn.execute(text("SELECT id, name FROM teams")).all())
        assert (names["team-a"], names["team-b"], names["team-c"]) == ("Research", "research-team-b", "RESEARCH")
        with pytest.raises(IntegrityError):  # the index itself refuses a name equal but for case
            conn.execute(text("INSERT INTO teams (id, name, created_at) VALUES ('team-e', 'VISION', 50)"))
        conn.rollback()
        conn.execute(text("UPDATE teams SET deleted_at = 60 WHERE id = 'team-d'"))  # a deleted team's name is free
        conn.execute(text("INSERT INTO teams (id, name, created_at) VALUES ('team-e', 'VISION', 50)"))
        conn.commit()
        command.downgrade(cfg, "0003")
        conn.commit()
        assert "runs" not in inspect(conn).get_table_names()
        assert conn.execute(text("SELECT started_at FROM jobs WHERE id = 'ftjob-again'")).scalar() == 100.0


def test_files_before_warnings_get_none(database_url):
    """A file uploaded before 0005 shows an empty list of warnings; downgrading drops the column."""
    with migrated(database_url, "0003") as (conn, cfg):
        conn.execute(text("INSERT INTO files (id, team_id, filename, purpose, bytes, format, rows, status, "
                          "storage_key, created_at) VALUES ('file-old', 'team-default', 'a.jsonl', 'fine-tune', 1, "
                          "'text', 1, 'processed', 'files/file-old.jsonl', 100)"))
        conn.commit()
        command.upgrade(cfg, "0005")
        conn.commit()
        warnings = conn.execute(text("SELECT warnings FROM files")).scalar()
        assert (json.loads(warnings) if isinstance(warnings, str) else warnings) == []
        command.downgrade(cfg, "0003")
        conn.commit()
        assert "warnings" not in {c["name"] for c in inspect(conn).get_columns("files")}


def test_existing_events_get_random_ids(database_url):
    """Events from before 0007 (ids were `ftevent-<seq>`) get random ids, unique, not their seq."""
    with migrated(database_url, "0003") as (conn, cfg):
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


def test_stored_jobs_get_their_specs_report_to_and_keep_their_events(database_url):
    """0011 fills jobs.report_to from each stored spec, and adds the column in place: a job's events,
    runs and checkpoints (ON DELETE CASCADE) survive the upgrade and the downgrade."""
    with migrated(database_url, "0010") as (conn, cfg):
        for job_id, spec in (("ftjob-mlflow", {"report_to": ["mlflow", "tensorboard"]}),
                             ("ftjob-none", {"report_to": []}), ("ftjob-old", {})):
            conn.execute(text("INSERT INTO jobs (id, team_id, status, model, training_file, method, "
                              "hyperparameters, spec, created_at, cancel_requested, result_files, priority, gpus) "
                              "VALUES (:i, 'team-default', 'queued', 'm', 'file-x', '{}', '{}', :s, 100, false, "
                              "'[]', 0, 1)"), {"i": job_id, "s": json.dumps(spec)})
            conn.execute(text("INSERT INTO events (id, job_id, created_at, level, type, message) "
                              "VALUES (:e, :i, 100, 'info', 'message', 'created')"), {"e": f"ftevent-{job_id}",
                                                                                       "i": job_id})
        conn.commit()
        command.upgrade(cfg, "head")
        conn.commit()
        rows = dict(conn.execute(text("SELECT id, report_to FROM jobs")).all())
        assert {k: json.loads(v) if isinstance(v, str) else v for k, v in rows.items()} == {
            "ftjob-mlflow": ["mlflow", "tensorboard"], "ftjob-none": [], "ftjob-old": []}
        assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 3
        command.downgrade(cfg, "0010")
        conn.commit()
        assert "report_to" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
        assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 3
