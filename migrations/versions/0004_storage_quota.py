"""storage: a checkpoint's size in bytes, a team's storage limit

`checkpoints.bytes` is the size of the checkpoint's directory when it was recorded, so a team's storage
(`GET /v1/usage`, the quota) is a sum over rows rather than a walk of the disk. Checkpoints recorded
before this migration count 0 bytes. `teams.max_storage_bytes` is the team's own limit; null means the
service's default (DPO_TEAM_STORAGE_BYTES), if any.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('checkpoints', sa.Column('bytes', sa.BigInteger(), server_default=sa.text('0'), nullable=False))
    op.add_column('teams', sa.Column('max_storage_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later): a batch copy of `teams` would have to drop
    # the table that files, jobs and keys reference.
    op.drop_column('teams', 'max_storage_bytes')
    op.drop_column('checkpoints', 'bytes')
