"""jobs: the trackers of the job's training.report_to, in a column of their own

The scheduler serves a job only from a worker that can import every tracker it asks for, matched in
SQL against workers.integrations, so the list lives beside the job's other asks (gpu_type, gpus)
rather than only inside its spec. Jobs stored before this get their spec's report_to.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

PAGE = 500
jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('spec', sa.JSON), sa.column('report_to', sa.JSON))


# Plain ALTER TABLE, not a batch: SQLite's batch mode would copy `jobs` and drop the old table, and that
# drop deletes every job's events, runs and checkpoints (ON DELETE CASCADE, foreign keys are on). A
# constant default (a string, not an expression) lets SQLite add the column in place; dropping it needs
# SQLite 3.35 or later.
def upgrade() -> None:
    op.add_column('jobs', sa.Column('report_to', sa.JSON(), server_default='[]', nullable=False))
    _backfill(op.get_bind())


def _backfill(conn) -> None:
    """Each stored job's report_to from its spec, a page of jobs (by id) at a time."""
    last = ''
    while True:
        rows = conn.execute(sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.id > last).order_by(jobs.c.id)
                            .limit(PAGE)).all()
        if not rows:
            return
        for job_id, spec in rows:
            report_to = (spec or {}).get('report_to') or []
            if report_to:
                conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(report_to=list(report_to)))
        last = rows[-1].id


def downgrade() -> None:
    op.drop_column('jobs', 'report_to')
