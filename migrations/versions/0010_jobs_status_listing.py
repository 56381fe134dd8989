"""jobs: indexes for the listing filtered by status (GET /v1/fine_tuning/jobs?status=...)

The listing pages newest first by (created_at, id); filtered by status, these indexes give those rows
already in order, for one team and for the admin's all-teams listing, so a page reads about `limit`
rows however rare the status. They replace (team_id, status) and (status), which they also serve.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 09:00:00
"""
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_team_id_status')
        batch.drop_index('ix_jobs_status')
        batch.create_index('ix_jobs_team_id_status_created_at_id', ['team_id', 'status', 'created_at', 'id'])
        batch.create_index('ix_jobs_status_created_at_id', ['status', 'created_at', 'id'])


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_status_created_at_id')
        batch.drop_index('ix_jobs_team_id_status_created_at_id')
        batch.create_index('ix_jobs_status', ['status'])
        batch.create_index('ix_jobs_team_id_status', ['team_id', 'status'])
