"""Heartbeats' placement check

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07

``heartbeats.placement``: the device's placement check (``cloud_sync.protocol.PlacementReport``
as JSON text, or NULL for devices from before issue 22): how big the faces its camera saw in the
class were and how many were recognised; the console's Devices page shows rooms whose camera is
badly placed.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("heartbeats") as batch:
        batch.add_column(sa.Column("placement", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("heartbeats") as batch:
        batch.drop_column("placement")
