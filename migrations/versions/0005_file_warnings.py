"""files: warnings about valid rows (identical pairs, unknown fields), as the upload's validation found them

Files uploaded before this migration get an empty list: they were not checked for these.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 18:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('files') as batch:
        batch.add_column(sa.Column('warnings', sa.JSON(), server_default=sa.text("'[]'"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('files') as batch:
        batch.drop_column('warnings')
