"""pre-flight reports, job estimates and measurements, worker memory

- `preflights`: a report made by POST /v1/fine_tuning/jobs/preflight, kept so that a job created from the
  same request soon after carries its estimate.
- jobs.estimate: that estimate; jobs.measured: what the worker measured on the run (train seconds,
  tokens/s, peak memory, the model's size, precision, gpu type), which calibrates later estimates.
- workers.memory_bytes: the memory of one of the worker's devices (one GPU; a CPU worker: its RAM).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 14:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


# Plain ALTER TABLE for nullable columns (see 0011: a SQLite batch copy of `jobs` would cascade-delete).
def upgrade() -> None:
    op.create_table(
        'preflights',
        sa.Column('id', sa.String(64), primary_key=True),
        sa.Column('team_id', sa.String(64), sa.ForeignKey('teams.id'), nullable=False),
        sa.Column('request_hash', sa.String(64), nullable=False),
        sa.Column('created_at', sa.BigInteger(), nullable=False),
        sa.Column('estimate', sa.JSON(), nullable=True),
    )
    op.create_index('ix_preflights_team_id_request_hash', 'preflights', ['team_id', 'request_hash', 'created_at'])
    op.add_column('jobs', sa.Column('estimate', sa.JSON(), nullable=True))
    op.add_column('jobs', sa.Column('measured', sa.JSON(), nullable=True))
    op.add_column('workers', sa.Column('memory_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column('workers', 'memory_bytes')
    op.drop_column('jobs', 'measured')
    op.drop_column('jobs', 'estimate')
    op.drop_index('ix_preflights_team_id_request_hash', 'preflights')
    op.drop_table('preflights')
