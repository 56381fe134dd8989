"""teams, api keys, workers; files and jobs belong to a team; jobs carry what they ask of the pool

Existing files and jobs go to the `default` team (the admin key's own). A job's start and end keep
their fraction of a second from now on, because GPU-seconds are computed from them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

DEFAULT_TEAM = 'team-default'
LIVE = sa.text('deleted_at IS NULL')


def upgrade() -> None:
    teams = op.create_table('teams',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('max_running_jobs', sa.Integer(), nullable=True),
    sa.Column('max_queued_jobs', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('deleted_at', sa.BigInteger(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_teams_created_at_id', 'teams', ['created_at', 'id'])
    op.create_index('uq_teams_name_live', 'teams', ['name'], unique=True, sqlite_where=LIVE, postgresql_where=LIVE)
    op.bulk_insert(teams, [{'id': DEFAULT_TEAM, 'name': 'default', 'max_running_jobs': None,
                            'max_queued_jobs': None, 'created_at': 0, 'deleted_at': None}])

    op.create_table('api_keys',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('team_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=True),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('hint', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('revoked_at', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_index('ix_api_keys_team_id', 'api_keys', ['team_id'])

    op.create_table('workers',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('gpu_type', sa.String(length=64), nullable=False),
    sa.Column('gpus', sa.Integer(), nullable=False),
    sa.Column('queue', sa.String(length=300), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('registered_at', sa.Float(), nullable=False),
    sa.Column('last_heartbeat_at', sa.Float(), nullable=False),
    sa.Column('stopped_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )

    # Existing rows join the default team through a server default, which is dropped afterwards:
    # from now on the service always names the team.
    with op.batch_alter_table('files') as batch:
        batch.add_column(sa.Column('team_id', sa.String(length=64), nullable=False, server_default=DEFAULT_TEAM))
        batch.create_foreign_key('fk_files_team_id_teams', 'teams', ['team_id'], ['id'])
        batch.create_index('ix_files_team_id_created_at_id', ['team_id', 'created_at', 'id'])
    with op.batch_alter_table('files') as batch:
        batch.alter_column('team_id', server_default=None)

    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('team_id', sa.String(length=64), nullable=False, server_default=DEFAULT_TEAM))
        batch.add_column(sa.Column('priority', sa.Integer(), nullable=False, server_default='0'))
        batch.add_column(sa.Column('gpu_type', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('gpus', sa.Integer(), nullable=False, server_default='1'))
        batch.add_column(sa.Column('dispatched_at', sa.Float(), nullable=True))
        batch.add_column(sa.Column('worker_id', sa.String(length=64), nullable=True))
        batch.alter_column('started_at', type_=sa.Float(), existing_type=sa.BigInteger(), existing_nullable=True)
        batch.alter_column('finished_at', type_=sa.Float(), existing_type=sa.BigInteger(), existing_nullable=True)
        batch.create_foreign_key('fk_jobs_team_id_teams', 'teams', ['team_id'], ['id'])
        batch.create_foreign_key('fk_jobs_worker_id_workers', 'workers', ['worker_id'], ['id'], ondelete='SET NULL')
        batch.create_index('ix_jobs_team_id_created_at_id', ['team_id', 'created_at', 'id'])
        batch.create_index('ix_jobs_team_id_status', ['team_id', 'status'])
        batch.create_index('ix_jobs_worker_id', ['worker_id'])
    with op.batch_alter_table('jobs') as batch:
        for column in ('team_id', 'priority', 'gpus'):
            batch.alter_column(column, server_default=None)


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_index('ix_jobs_worker_id')
        batch.drop_index('ix_jobs_team_id_status')
        batch.drop_index('ix_jobs_team_id_created_at_id')
        batch.drop_constraint('fk_jobs_worker_id_workers', type_='foreignkey')
        batch.drop_constraint('fk_jobs_team_id_teams', type_='foreignkey')
        batch.alter_column('finished_at', type_=sa.BigInteger(), existing_type=sa.Float(), existing_nullable=True)
        batch.alter_column('started_at', type_=sa.BigInteger(), existing_type=sa.Float(), existing_nullable=True)
        for column in ('worker_id', 'dispatched_at', 'gpus', 'gpu_type', 'priority', 'team_id'):
            batch.drop_column(column)
    # A job dispatched but not started is simply queued again in the old schema.
    op.execute("UPDATE jobs SET status = 'queued' WHERE status = 'dispatched'")
    with op.batch_alter_table('files') as batch:
        batch.drop_index('ix_files_team_id_created_at_id')
        batch.drop_constraint('fk_files_team_id_teams', type_='foreignkey')
        batch.drop_column('team_id')
    op.drop_table('workers')
    op.drop_index('ix_api_keys_team_id', table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_index('uq_teams_name_live', table_name='teams')
    op.drop_index('ix_teams_created_at_id', table_name='teams')
    op.drop_table('teams')
