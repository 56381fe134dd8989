"""The job store: SQLAlchemy models, engine/session set-up and Alembic start-up. Shared by API and worker."""
