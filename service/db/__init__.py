"""The database: SQLAlchemy models (models), engines and sessions (engine), the schema brought up to
date at start-up by the Alembic migrations (migrate), and the reads and writes each table needs: jobs,
teams and keys, workers, leases and runs, row locks, usage and storage quotas."""
