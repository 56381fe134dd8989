"""The read sessions the polled routes use (service.db.engine.make_read_sessionmaker): a read leaves no
transaction open on the database connection, and a write through one is refused, on SQLite and on
PostgreSQL; a read whose pooled connection the server dropped is tried again on a new one. And the
status route's one-query lookup of a key and a job."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError

from api.schemas.jobs import JobPublic
from service.db.engine import make_engine, make_read_engine, make_read_sessionmaker, make_sessionmaker, read_with_retry
from service.db.jobs import job_row
from service.db.migrate import upgrade
from service.db.models import ApiKey, Job, JobStatus, Team, new_id, now
from service.db.teams import create_key, create_team, key_and_job, revoke_key


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'dpo.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade(url)
    return url


def _in_transaction(session) -> bool:
    """Whether the driver connection under `session` is inside a transaction on the server."""
    dbapi = session.connection().connection.dbapi_connection
    if hasattr(dbapi, "in_transaction"):  # sqlite3
        return dbapi.in_transaction
    import psycopg2.extensions as ext

    return dbapi.info.transaction_status != ext.TRANSACTION_STATUS_IDLE


def test_a_read_leaves_no_transaction_open(db_url):
    engine = make_read_engine(db_url)
    try:
        with make_read_sessionmaker(engine)() as session:
            assert session.scalars(select(Team)).all() is not None
            assert not _in_transaction(session)  # no BEGIN before, so no ROLLBACK after
    finally:
        engine.dispose()


def test_the_ordinary_session_does_open_one_on_postgres(postgres_url):
    """The contrast that makes the test above mean something: psycopg2 begins a transaction for a
    SELECT, so a read in an ordinary session costs BEGIN and ROLLBACK round trips as well."""
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    try:
        with make_sessionmaker(engine)() as session:
            session.scalars(select(Team)).all()
            assert _in_transaction(session)
    finally:
        engine.dispose()


def test_a_read_session_refuses_writes(db_url):
    engine = make_read_engine(db_url)
    try:
        with make_read_sessionmaker(engine)() as session:
            session.add(Team(id=new_id("team"), name="written-by-a-read", created_at=now()))
            with pytest.raises(RuntimeError, match="cannot write"):
                session.flush()
        with make_read_sessionmaker(engine)() as session:
            assert session.scalars(select(Team).where(Team.name == "written-by-a-read")).first() is None
    finally:
        engine.dispose()


def test_an_autocommit_view_of_an_engine_also_reads_without_a_transaction(db_url):
    """The in-memory SQLite case of api.main: the read sessions share the writer's engine (and database)."""
    engine = make_engine(db_url)
    try:
        with make_read_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))() as session:
            session.scalars(select(Team)).all()
            assert not _in_transaction(session)
    finally:
        engine.dispose()


def test_a_read_is_tried_again_when_the_server_dropped_its_connection(postgres_url):
    """The read engine does not ping each connection before use (a round trip per request); a read
    that finds its connection dead (the server restarted, or an admin ended the backend) runs again."""
    upgrade(postgres_url)
    engine, admin = make_read_engine(postgres_url), create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    sessions = make_read_sessionmaker(engine)

    def backend(session) -> int:
        return session.execute(text("SELECT pg_backend_pid()")).scalar()

    def end(pid: int) -> None:
        with admin.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid}).scalar()

    try:
        end(read_with_retry(sessions, backend))
        with pytest.raises(DBAPIError) as dropped, sessions() as session:  # without the retry: an error
            backend(session)
        assert dropped.value.connection_invalidated
        first = read_with_retry(sessions, backend)
        end(first)
        assert read_with_retry(sessions, backend) != first
    finally:
        engine.dispose()
        admin.dispose()


def _team_with_key_and_job(session, name: str):
    team = create_team(session, name, None, None)
    session.flush()
    key = create_key(session, team, None).key
    job = Job(id=new_id("ftjob"), team_id=team.id, status=JobStatus.QUEUED.value, model="m", training_file="file-x",
              method={}, hyperparameters={}, spec={"beta": 0.1}, metadata_={"k": "v"}, created_at=now(),
              result_files=[], cancel_requested=False, max_attempts=3)
    session.add(job)
    return team, key, job


def test_one_query_finds_the_key_and_its_teams_job(db_url):
    """service.db.teams.key_and_job, the status route's lookup: the key's team's job as a row named as
    Job's attributes; another team's job, an unknown id or no id give no row; a revoked key, nothing."""
    engine, reader = make_engine(db_url), make_read_engine(db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            a_team, a_key, a_job = _team_with_key_and_job(session, "reads-a")
            _, b_key, b_job = _team_with_key_and_job(session, "reads-b")
            revoked = create_key(session, a_team, None)
        with make_sessionmaker(engine).begin() as session:
            revoke_key(session, session.get(ApiKey, revoked.row.id))
        with make_read_sessionmaker(reader)() as session:
            _, team_id, row = key_and_job(session, a_key, a_job.id)
            assert (team_id, row.id, row.team_id, row.status) == (a_team.id, a_job.id, a_team.id, "queued")
            assert (row.spec, row.metadata_, row.result_files) == ({"beta": 0.1}, {"k": "v"}, [])
            assert key_and_job(session, b_key, a_job.id)[2] is None  # another team's job
            assert key_and_job(session, a_key, "ftjob-" + "0" * 28)[2] is None
            assert key_and_job(session, a_key, None)[2] is None
            assert key_and_job(session, revoked.key, a_job.id) is None
            assert key_and_job(session, "dpo-sk-not-a-key", a_job.id) is None
            assert job_row(session, b_job.id).team_id != team_id  # the admin's lookup: any team's job
    finally:
        engine.dispose()
        reader.dispose()


def test_a_job_row_reads_as_its_job(db_url):
    """The status route builds JobPublic from a row of JOB_FIELDS, the list and cancel routes from Job
    objects: every field comes out the same, JSON columns and the `metadata_` rename included."""
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            _, _, job = _team_with_key_and_job(session, "reads-row")
            job.status, job.started_at, job.step, job.total_steps = JobStatus.RUNNING.value, now(), 3, 10
            job.metrics, job.error_code, job.error_message = {"loss": 0.5}, "oom", "out of memory"
        with make_sessionmaker(engine)() as session:
            as_object = JobPublic.of(session.get(Job, job.id))
            assert JobPublic.of(job_row(session, job.id)) == as_object
            assert as_object.metadata == {"k": "v"} and as_object.progress.step == 3
    finally:
        engine.dispose()
