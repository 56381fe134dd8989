"""What live event streams read (api.streams): pages of one job's events, the new events of many jobs
at once, which jobs have new events, and PostgreSQL's notifications of them (service.db.jobs.add_event).

Every read orders by `seq`. One job's events commit in seq order (add_event), so a stream that has read
a job's events up to seq N has all of that job's events up to N, and never sees an earlier one appear.
"""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Row, and_, func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service.db.jobs import EVENTS_CHANNEL
from service.db.models import Event, Job

FIELDS = (Event.seq, Event.id, Event.job_id, Event.created_at, Event.level, Event.type, Event.message, Event.data)
JOBS_PER_READ = 100  # jobs whose new events one statement asks for (two bound parameters each)


def page_after(session: Session, job_id: str, seq: int, limit: int) -> tuple[str | None, list[Row]]:
    """The job's status, then up to `limit` of its events after `seq`, oldest first. The status is read
    first: when it is terminal and fewer than `limit` events come, they are the job's last."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    rows = session.execute(select(*FIELDS).where(Event.job_id == job_id, Event.seq > seq)
                           .order_by(Event.seq).limit(limit)).all()
    return status, list(rows)


def events_after(session: Session, cursors: dict[str, int], limit: int) -> tuple[list[Row], bool]:
    """Events of the jobs in `cursors`, each after its cursor (a seq), oldest first, and whether more
    are left. With more left, every event of these jobs up to the last one given is among them: a read
    that stops at `limit` rows stops at a seq, and the others are cut at the same seq."""
    jobs, rows, cut = list(cursors.items()), [], None
    for start in range(0, len(jobs), JOBS_PER_READ):
        terms = [and_(Event.job_id == job, Event.seq > seq) for job, seq in jobs[start:start + JOBS_PER_READ]]
        found = session.execute(select(*FIELDS).where(or_(*terms)).order_by(Event.seq).limit(limit)).all()
        rows += found
        if len(found) == limit:
            cut = min(cut or found[-1].seq, found[-1].seq)
    rows.sort(key=lambda r: r.seq)
    return ([r for r in rows if r.seq <= cut], True) if cut is not None else (rows, False)


def latest(session: Session, job_ids: Iterable[str]) -> dict[str, int]:
    """Each job's latest event's seq (jobs without events are left out)."""
    stmt = select(Event.job_id, func.max(Event.seq)).where(Event.job_id.in_(list(job_ids))).group_by(Event.job_id)
    return dict(session.execute(stmt).all())


def changed_since(session: Session, seq: int) -> dict[str, int]:
    """The jobs with events after `seq` (one sequence across all jobs), each with its latest event's seq.
    On SQLite, whose writers commit one at a time in seq order, how a poll finds what is new."""
    stmt = select(Event.job_id, func.max(Event.seq)).where(Event.seq > seq).group_by(Event.job_id)
    return dict(session.execute(stmt).all())


def last_seq(session: Session) -> int:
    return session.scalar(select(func.max(Event.seq))) or 0


def listen(url: str, keepalive_s: int = 30):
    """A psycopg2 connection (not pooled) that listens on EVENTS_CHANNEL; read it with `notified` when its
    socket (`fileno()`) is readable. ConnectionError when the database cannot be reached. TCP keepalives
    make a server that vanished without a word show as an error on the socket."""
    import psycopg2

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        conn = psycopg2.connect(dsn, keepalives=1, keepalives_idle=keepalive_s, keepalives_interval=5,
                                keepalives_count=3, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {EVENTS_CHANNEL}")
    except psycopg2.OperationalError as err:
        raise ConnectionError(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__) from err
    return conn


def notified(conn) -> set[str]:
    """The jobs named by the notifications that have arrived on `conn` (without waiting for any);
    ConnectionError when the connection is lost."""
    import psycopg2

    try:
        conn.poll()
    except psycopg2.Error as err:
        raise ConnectionError(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__) from err
    jobs = {n.payload for n in conn.notifies}
    conn.notifies.clear()
    return jobs
