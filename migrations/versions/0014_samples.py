"""samples: a job's completions of fixed validation prompts, one row per sampling step

- samples.records: a JSON list, one entry per prompt: {prompt, reference: {text, tokens, reward[, score]},
  policy: {...}} (dpo_core.samples); samples.summary: the step's mean lengths and win rate.
- one row per (job, step): a resumed run that samples a step again replaces its row.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 16:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'samples',
        sa.Column('job_id', sa.String(length=64), sa.ForeignKey('jobs.id', ondelete='CASCADE'), nullable=False),
        sa.Column('step', sa.BigInteger(), nullable=False),
        sa.Column('records', sa.JSON(), nullable=False),
        sa.Column('summary', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('job_id', 'step'),
    )


def downgrade() -> None:
    op.drop_table('samples')
