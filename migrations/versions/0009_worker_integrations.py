"""workers: the trackers each can import (training.report_to)

A worker says, when it registers, which of tensorboard, mlflow and wandb it can import, so that a job
whose report_to names one no live worker that could run it has is refused at submission. Workers
registered before this (NULL) are unknown: they never cause a refusal.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 08:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.add_column(sa.Column('integrations', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workers') as batch:
        batch.drop_column('integrations')
