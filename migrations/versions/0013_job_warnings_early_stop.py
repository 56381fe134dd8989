"""jobs: the diagnostics a run raised, and the step at which early stopping ended it

- jobs.warnings: a JSON list of {code, step, message}, one per diagnostic of the job's runs
  (dpo_core.diagnostics), shown on the job object; the events hold the evidence.
- jobs.early_stopped_at_step: the step at which training.early_stopping ended the run.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 15:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


# Plain ALTER TABLE for nullable columns (see 0011: a SQLite batch copy of `jobs` would cascade-delete).
def upgrade() -> None:
    op.add_column('jobs', sa.Column('warnings', sa.JSON(), nullable=True))
    op.add_column('jobs', sa.Column('early_stopped_at_step', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'early_stopped_at_step')
    op.drop_column('jobs', 'warnings')
