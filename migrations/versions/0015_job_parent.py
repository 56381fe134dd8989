"""jobs: the checkpoint a job continues from

- jobs.parent_checkpoint: the checkpoint id a job's `model` named (or the final model of the job it named),
  which its policy starts from (service.parents); jobs.parent_job: that checkpoint's job. Both shown on the
  job object as `parent`.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 14:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


# Plain ALTER TABLE for nullable columns (see 0011: a SQLite batch copy of `jobs` would cascade-delete).
def upgrade() -> None:
    op.add_column('jobs', sa.Column('parent_checkpoint', sa.String(length=64), nullable=True))
    op.add_column('jobs', sa.Column('parent_job', sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'parent_job')
    op.drop_column('jobs', 'parent_checkpoint')
