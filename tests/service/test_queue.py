"""The embedded broker's queues: declared before use, and a lost race to create one is retried."""
from __future__ import annotations

import sqlite3

from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy.exc import IntegrityError

from api.queue import enqueue_job, make_celery
from service.broker import declare_queue
from tests.service.support import make_settings


def _queue_names(settings) -> list[str]:
    with sqlite3.connect(settings.data_dir / "broker.sqlite") as db:
        return [name for (name,) in db.execute("SELECT name FROM kombu_queue")]


def test_declare_creates_the_queue_once(tmp_path):
    settings = make_settings(tmp_path)
    app = make_celery(settings)
    declare_queue(app, "dpo.worker.a")
    declare_queue(app, "dpo.worker.a")
    assert _queue_names(settings) == ["dpo.worker.a"]
    declare_queue(make_celery(settings), "dpo.worker.a")  # another process's app finds the row
    assert _queue_names(settings) == ["dpo.worker.a"]


def test_a_declared_queue_is_not_declared_again(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)
    app = make_celery(settings)
    enqueue_job(app, "job-1", "dpo.worker.e")  # declares the queue, and opens the app's producer pool
    opened = []
    original = type(app).connection_for_write
    monkeypatch.setattr(type(app), "connection_for_write",
                        lambda self, *a, **k: opened.append(1) or original(self, *a, **k))
    enqueue_job(app, "job-2", "dpo.worker.e")
    enqueue_job(app, "job-3", "dpo.worker.e")
    with sqlite3.connect(settings.data_dir / "broker.sqlite") as db:
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (3,)
    assert opened == []  # later sends reuse the producer pool and declare nothing


def test_a_lost_race_to_create_the_queue_is_retried(tmp_path, monkeypatch):
    # Another process inserting the same row first makes this one's insert fail with IntegrityError.
    settings = make_settings(tmp_path)
    app = make_celery(settings)
    original, calls = kombu_sqla.Channel._new_queue, []

    def lose_once(channel, queue, **kwargs):
        calls.append(queue)
        if len(calls) == 1:
            raise IntegrityError("INSERT INTO kombu_queue", {}, Exception("UNIQUE constraint failed"))
        return original(channel, queue, **kwargs)

    monkeypatch.setattr(kombu_sqla.Channel, "_new_queue", lose_once)
    declare_queue(app, "dpo.worker.b")
    assert calls == ["dpo.worker.b", "dpo.worker.b"] and _queue_names(settings) == ["dpo.worker.b"]


def test_a_lost_race_to_create_the_brokers_tables_is_retried(tmp_path, monkeypatch):
    # Another process creating kombu's tables between this one's check and its CREATE TABLE: the real
    # "table kombu_queue already exists", made to happen by creating them just before an unchecked create.
    settings = make_settings(tmp_path)
    app = make_celery(settings)
    original, calls = kombu_sqla.metadata.create_all, []

    def lose_once(engine, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            original(engine)  # the other process wins
            return original(engine, checkfirst=False)
        return original(engine, **kwargs)

    monkeypatch.setattr(kombu_sqla.metadata, "create_all", lose_once)
    monkeypatch.setattr(kombu_sqla.Channel, "_engines", {})  # as in a new process: tables not yet checked
    declare_queue(app, "dpo.worker.t")
    assert len(calls) == 2 and _queue_names(settings) == ["dpo.worker.t"]


def test_sending_a_job_declares_its_queue_first(tmp_path):
    settings = make_settings(tmp_path)
    app = make_celery(settings)
    enqueue_job(app, "job-1", "dpo.worker.c")
    assert _queue_names(settings) == ["dpo.worker.c"]
    with sqlite3.connect(settings.data_dir / "broker.sqlite") as db:
        assert db.execute("SELECT count(*) FROM kombu_message").fetchone() == (1,)


def test_other_brokers_need_no_declaration(tmp_path):
    app = make_celery(make_settings(tmp_path, broker_url="redis://127.0.0.1:1/0"))  # nothing listens there
    declare_queue(app, "dpo.worker.d")  # returns without connecting
