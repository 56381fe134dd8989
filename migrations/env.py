"""Alembic environment. `service.db.migrate.upgrade` passes an open connection in; the `alembic` command
line builds one from DPO_DATABASE_URL (or the embedded default) instead."""
from alembic import context

from service.db.models import Base


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from service.db.engine import make_engine
    from service.settings import get_settings

    url = context.config.get_main_option("sqlalchemy.url") or get_settings().db_url
    with make_engine(url).connect() as conn:
        _run(conn)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
main()
