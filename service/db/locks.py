"""Row locks that keep several API processes (and workers) from deciding the same thing twice.

PostgreSQL locks rows (`SELECT ... FOR UPDATE`, with `SKIP LOCKED` where another process may take
the next row instead of waiting). SQLite has no row locks: its one writer lock serializes every
critical section instead, taken up front by a write that changes nothing (SQLite then holds the
lock until the transaction ends, and later reads in it see every committed change).
"""
from __future__ import annotations

from sqlalchemy import Select, select, text
from sqlalchemy.orm import Session

from service.db.models import File, Team, Worker


def is_sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def writer_lock(session: Session) -> None:
    """On SQLite, take the database's writer lock now (waiting up to the busy timeout); elsewhere nothing."""
    if is_sqlite(session):
        session.execute(text("UPDATE teams SET id = id WHERE 0"))


def lock_team(session: Session, team_id: str) -> Team | None:
    """The team's row, locked until the transaction ends (SQLite: the whole database is)."""
    writer_lock(session)
    return session.scalars(
        select(Team).where(Team.id == team_id).with_for_update().execution_options(populate_existing=True)
    ).one_or_none()


def try_lock_worker(session: Session, worker_id: str) -> bool:
    """Lock a worker's row unless another process holds it (then False: that process is dispatching to it)."""
    writer_lock(session)
    stmt: Select = select(Worker.id).where(Worker.id == worker_id).with_for_update(skip_locked=True)
    return session.scalar(stmt) is not None


def lock_files(session: Session, file_ids: list[str]) -> set[str]:
    """Lock the rows of these files until the transaction ends (SQLite: the whole database); returns
    the ids that still exist. A job's creation and a file's deletion both take it before they decide,
    so a file is never deleted under a job being created, nor a job created on a deleted file."""
    writer_lock(session)
    stmt = select(File.id).where(File.id.in_(file_ids)).with_for_update()
    return set(session.scalars(stmt))
