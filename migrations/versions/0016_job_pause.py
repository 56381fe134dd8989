"""jobs: a pause asked of a running job

- jobs.pause_requested: set by POST /v1/fine_tuning/jobs/{id}/pause while the job runs; its run
  checkpoints at the next step and the job ends `paused` (a new value of jobs.status, a plain string).

Revision ID: 0016
Revises: 0013
Create Date: 2026-12-03 16:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


# A plain ALTER TABLE (see 0011: a SQLite batch copy of `jobs` would cascade-delete).
def upgrade() -> None:
    op.add_column('jobs', sa.Column('pause_requested', sa.Boolean(), nullable=False, server_default=sa.text('false')))


def downgrade() -> None:
    op.drop_column('jobs', 'pause_requested')
