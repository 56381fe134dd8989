"""jobs: leases with fencing tokens, attempts, hand-back on worker shutdown, Idempotency-Key

A running job is owned by the run that holds its lease (`lease_token`, `lease_expires_at`); the
dispatcher's reconciler queues a job again when its lease runs out. Jobs that are running when this
migration runs have no lease yet; the reconciler treats them as expired, so stop the workers of the
old version before upgrading (their jobs then resume from their latest checkpoint).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('handback_requested', sa.Boolean(), server_default=sa.text('false'),
                                   nullable=False))
        batch.add_column(sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False))
        batch.add_column(sa.Column('max_attempts', sa.Integer(), server_default=sa.text('3'), nullable=False))
        batch.add_column(sa.Column('lease_token', sa.BigInteger(), server_default=sa.text('0'), nullable=False))
        batch.add_column(sa.Column('lease_expires_at', sa.Float(), nullable=True))
        batch.add_column(sa.Column('idempotency_key', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('request_hash', sa.String(length=64), nullable=True))
        batch.create_index('uq_jobs_team_id_idempotency_key', ['team_id', 'idempotency_key'], unique=True)
    # A job that already ran once has used one attempt.
    op.execute("UPDATE jobs SET attempts = 1 WHERE started_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('uq_jobs_team_id_idempotency_key')
        for name in ('request_hash', 'idempotency_key', 'lease_expires_at', 'lease_token', 'max_attempts',
                     'attempts', 'handback_requested'):
            batch.drop_column(name)
