"""Alembic migrations: the only way dpo-service's schema is made (see service.db.migrate)."""
