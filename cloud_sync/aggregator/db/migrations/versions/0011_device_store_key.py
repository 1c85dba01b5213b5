"""Devices' store keys

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01

``devices.store_key``: the key of the device's encrypted SQLite store (SQLCipher), handed to
the device at its start (``POST /api/v1/store-key``) and kept there in memory only. Made at the
device's first request; deleting the device deletes it (docs/PRIVACY.md, the device at rest).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("store_key", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("store_key")
