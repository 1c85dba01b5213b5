"""Leaner attendance indexes for ingest speed

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

- ``ix_attendance_uncertain`` becomes a partial index over the records made with an
  unsynchronised clock only (the only rows heartbeat re-correction looks up), instead of
  indexing every record.
- PostgreSQL: the plain index on ``attendance.key`` goes; uniqueness and look-ups by key use
  ``attendance_keys`` (SQLite keeps its unique index: there it IS the idempotency guard).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UNSYNCED = sa.text("clock_synced = false")


def upgrade() -> None:
    op.drop_index("ix_attendance_uncertain", table_name="attendance")
    op.create_index(
        "ix_attendance_unsynced", "attendance", ["device_id", "boot_id"],
        postgresql_where=UNSYNCED, sqlite_where=sa.text("clock_synced = 0"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_attendance_key", table_name="attendance")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index("ix_attendance_key", "attendance", ["key"])
    op.drop_index("ix_attendance_unsynced", table_name="attendance")
    op.create_index(
        "ix_attendance_uncertain", "attendance", ["device_id", "boot_id", "time_uncertain"]
    )
