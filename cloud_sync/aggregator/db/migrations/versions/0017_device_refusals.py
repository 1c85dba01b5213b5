"""Devices' last refused contact

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07

``devices.refused_at`` / ``refused_reason`` / ``refused_room``: the last time the aggregator
refused a device whose key it accepted, why (``room_mismatch``), and the room the device said
it was in. The console shows "registered to RM-12, configured for RM-14: change config or
re-register" instead of "last heartbeat never" (issue 25 item 8).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("refused_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("refused_reason", sa.String(32), nullable=True))
        batch.add_column(sa.Column("refused_room", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("refused_room")
        batch.drop_column("refused_reason")
        batch.drop_column("refused_at")
