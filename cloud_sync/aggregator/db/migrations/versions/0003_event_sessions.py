"""Events carry their class session (event schema v2)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

- ``events.session_id`` (``<course_id>@<YYYY-MM-DD>``, NULL outside a class and for v1
  events) and ``events.v`` (the event's schema version);
- ``ix_events_room_session_kind`` serves the per-session occupancy/attention timelines;
- ``ix_events_at`` serves the retention delete (events older than ``events_keep_days``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("session_id", sa.String(100), nullable=True))
        batch.add_column(sa.Column("v", sa.SmallInteger(), nullable=False,
                                   server_default="1"))
    op.create_index("ix_events_room_session_kind", "events",
                    ["room_id", "session_id", "kind", "at"])
    op.create_index("ix_events_at", "events", ["at"])


def downgrade() -> None:
    op.drop_index("ix_events_at", table_name="events")
    op.drop_index("ix_events_room_session_kind", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("v")
        batch.drop_column("session_id")
