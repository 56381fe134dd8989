"""events: a random public id per event

An event's id was `ftevent-<seq>`, and seq is one sequence across every job of every team, so the
gap between two of a team's event ids told it how many events other teams' jobs had written in
between. Each event now has an id of its own (`ftevent-` + random hex), and the API pages by looking
the cursor up. Existing events get random ids too, so a client's cursor from before the upgrade is
no longer found (`400` on `after`): it starts again from the newest event, or from the first.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 09:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# 96 random bits per existing event, in each dialect's own SQL (one statement, however many events).
RANDOM_IDS = {
    'sqlite': "UPDATE events SET id = 'ftevent-' || lower(hex(randomblob(12)))",
    'postgresql': "UPDATE events SET id = 'ftevent-' || substr(md5(random()::text || seq::text), 1, 24)",
}


def upgrade() -> None:
    with op.batch_alter_table('events') as batch:
        batch.add_column(sa.Column('id', sa.String(length=64), nullable=True))
    op.execute(RANDOM_IDS[op.get_bind().dialect.name])
    with op.batch_alter_table('events') as batch:
        batch.alter_column('id', existing_type=sa.String(length=64), nullable=False)
        batch.create_index('uq_events_id', ['id'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('events') as batch:
        batch.drop_index('uq_events_id')
        batch.drop_column('id')
