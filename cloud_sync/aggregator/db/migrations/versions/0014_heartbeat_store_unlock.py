"""Heartbeats' store unlock

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07

``heartbeats.store_unlock``: how the device's encrypted store was opened at this start
(``cloud_sync.protocol.StoreUnlockReport`` as JSON text, or NULL for devices from before issue
26 and unencrypted ones): with the aggregator's key, or offline with the key kept on its card
(sealed with the board's OTP key, or the card key of the flash-time policy). The console's
Devices page lists the devices that run on an offline unlock.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("heartbeats") as batch:
        batch.add_column(sa.Column("store_unlock", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("heartbeats") as batch:
        batch.drop_column("store_unlock")
