"""Job workers

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07

``job_workers``: one row per running ``aggregator worker`` (database queue), its ``seen_at``
written every poll, the row removed when it stops: the console's recordings pages say when no
worker is alive (issue 25 item 11: under ``make run`` jobs stayed "queued" with no hint).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job_workers",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("seen_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_workers")
