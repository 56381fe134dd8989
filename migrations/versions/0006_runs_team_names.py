"""runs of jobs (GPU-seconds count only while a run holds a worker); team names unique in any case

`runs`: one row per run of a job, from its start on a worker to its end (finished, handed back, lost).
Existing jobs become runs where their times say what ran: a running job is one open run; a finished
job that started is one run from `started_at` to `finished_at`. A job waiting again after an earlier
run has no record of when that run ended, so it gets none (its earlier time is not counted).

Team names: the unique index on live teams' names becomes one on `lower(name)`. Live teams whose
names differ only in case are kept apart first: the oldest keeps its name, each other one is renamed
`<name>-<team id>`.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

LIVE = sa.text('deleted_at IS NULL')


def upgrade() -> None:
    op.create_table('runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('team_id', sa.String(length=64), nullable=False),
    sa.Column('gpus', sa.Integer(), nullable=False),
    sa.Column('token', sa.BigInteger(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('ended_at', sa.Float(), nullable=True),
    sa.Column('outcome', sa.String(length=32), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id']),
    sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('uq_runs_job_id_token', 'runs', ['job_id', 'token'], unique=True)
    op.create_index('ix_runs_team_id_started_at', 'runs', ['team_id', 'started_at'])
    op.execute(
        "INSERT INTO runs (job_id, team_id, gpus, token, attempt, worker, started_at, ended_at, outcome) "
        "SELECT id, team_id, gpus, lease_token, CASE WHEN attempts > 0 THEN attempts ELSE 1 END, worker, started_at, "
        "CASE WHEN status = 'running' THEN NULL ELSE finished_at END, "
        "CASE WHEN status = 'running' THEN NULL ELSE status END "
        "FROM jobs WHERE started_at IS NOT NULL AND (status = 'running' OR "
        "(status IN ('succeeded', 'failed', 'cancelled') AND finished_at IS NOT NULL))")

    _rename_names_equal_but_for_case()
    op.drop_index('uq_teams_name_live', table_name='teams')
    op.create_index('uq_teams_lower_name_live', 'teams', [sa.text('lower(name)')], unique=True,
                    sqlite_where=LIVE, postgresql_where=LIVE)


def _rename_names_equal_but_for_case() -> None:
    conn = op.get_bind()
    taken = set()
    rows = conn.execute(sa.text("SELECT id, name FROM teams WHERE deleted_at IS NULL ORDER BY created_at, id"))
    for team_id, name in rows.all():
        if name.lower() in taken:
            conn.execute(sa.text("UPDATE teams SET name = :name WHERE id = :id"),
                         {"name": f"{name[:128 - len(team_id) - 1]}-{team_id}", "id": team_id})
        taken.add(name.lower())


def downgrade() -> None:
    op.drop_index('uq_teams_lower_name_live', table_name='teams')
    op.create_index('uq_teams_name_live', 'teams', ['name'], unique=True, sqlite_where=LIVE, postgresql_where=LIVE)
    op.drop_index('ix_runs_team_id_started_at', table_name='runs')
    op.drop_index('uq_runs_job_id_token', table_name='runs')
    op.drop_table('runs')
