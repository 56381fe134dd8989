"""Engines and sessions for SQLite (the embedded default) and PostgreSQL."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
T = TypeVar("T")

# The errors of a database that cannot answer now, and may later: it is down, restarting or unreachable
# (no connection, or one dropped mid-statement), it refused a transaction it may take when retried (a
# deadlock, SQLite's lock held past its busy timeout), or no pooled connection came free in time. Any
# other database error (a constraint, a bad statement) is a bug, and trying again would not help.
UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


def is_unavailable(err: BaseException) -> bool:
    """Whether `err` says the database cannot answer now (see UNAVAILABLE): worth trying again."""
    return isinstance(err, UNAVAILABLE) or (isinstance(err, DBAPIError) and err.connection_invalidated)


def make_engine(url: str, **options) -> Engine:
    """An engine for `url`; SQLite files get WAL and a busy timeout because API and worker share them.
    `options` go to create_engine (e.g. poolclass=NullPool for a thread that must hold no connection)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # Checking a connection before use costs a round trip per checkout, but survives a database restart.
        return create_engine(url, **{"pool_pre_ping": True, **options})
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **options)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (the API) go on while a writer (the worker) commits.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_read_engine(url: str, **options) -> Engine:
    """An engine whose connections are in autocommit from the start, for make_read_sessionmaker. (An
    autocommit view of another engine sets and resets the mode around every checkout.) No check before
    each use: `read_with_retry` tries a read again instead when its connection turns out dead."""
    return make_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=False, **options)


def read_with_retry(sessions: sessionmaker[Session], fn: Callable[..., T], *args) -> T:
    """`fn(session, *args)` in a new session; once more if the database dropped the connection (a
    restart: SQLAlchemy then discards every pooled connection, so the second try connects anew). Only
    for reads, which are safe to repeat."""
    try:
        return _in_session(sessions, fn, *args)
    except DBAPIError as err:
        if not err.connection_invalidated:
            raise
        return _in_session(sessions, fn, *args)


def _in_session(sessions: sessionmaker[Session], fn: Callable[..., T], *args) -> T:
    with sessions() as session:
        return fn(session, *args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions for requests that only read, on an engine in autocommit (make_read_engine, or
    `engine.execution_options(isolation_level="AUTOCOMMIT")`, which shares a pool): so a read is the query
    alone, not BEGIN, query and ROLLBACK (three round trips to the database on every status poll). Each
    statement then sees its own snapshot, as under PostgreSQL's default READ COMMITTED anyway. A flush
    raises: a write here would commit statement by statement, outside any transaction."""
    sessions = sessionmaker(bind=engine, autoflush=False)
    event.listen(sessions, "before_flush", _refuse_writes)
    return sessions


def _refuse_writes(session: Session, _context, _instances) -> None:
    raise RuntimeError("a read session cannot write: use a session from make_sessionmaker")
