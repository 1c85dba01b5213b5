"""Per-device rate limit shared by every aggregator process (PostgreSQL)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01

``rate_buckets``: one token bucket per device, updated by one atomic
``INSERT ... ON CONFLICT DO UPDATE`` per request (``api/limiter.py``), so any number of
aggregator processes on any number of servers share one limit. UNLOGGED: no WAL, no fsync per
request; after a crash PostgreSQL empties it, which only gives every device a full bucket.
SQLite runs one process (``serve`` refuses more), whose limit stays in memory: no table.
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE UNLOGGED TABLE rate_buckets ("
        "key varchar(200) PRIMARY KEY, "
        "tokens double precision NOT NULL, "
        "at timestamptz NOT NULL, "
        "allowed boolean NOT NULL)"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TABLE rate_buckets")
