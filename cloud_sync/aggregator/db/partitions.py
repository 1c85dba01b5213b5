"""Monthly RANGE partitions of ``attendance`` on PostgreSQL (a no-op on SQLite).

Partitions are named ``attendance_pYYYYMM`` and hold ``[first of month, first of next month)``
in UTC. :func:`ensure_months` creates missing ones; rows that had landed in
``attendance_default`` for that month are moved into the new partition in the same
transaction (PostgreSQL refuses to create a partition whose range the default still holds).
Months far from now (a device with a clock stuck in 1970) are left to the default partition.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, text

if TYPE_CHECKING:
    from cloud_sync.aggregator.state import AppState

_LOGGER = logging.getLogger(__name__)
_LOCK_ID = 4_242_001  # pg_advisory_xact_lock id serialising partition creation
MAX_PAST_MONTHS = 24
MAX_FUTURE_MONTHS = 24


def month_start(value: datetime | date) -> date:
    if isinstance(value, datetime):
        value = value.astimezone(UTC).date()
    return value.replace(day=1)


def add_months(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"attendance_p{month.year:04d}{month.month:02d}"


def existing_months(conn: Connection) -> set[date]:
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'attendance'"
        )
    ).scalars()
    months: set[date] = set()
    for name in rows:
        if name.startswith("attendance_p") and len(name) == 18 and name[12:].isdigit():
            months.add(date(int(name[12:16]), int(name[16:18]), 1))
    return months


def _create(conn: Connection, month: date) -> None:
    lo = month.isoformat()
    hi = add_months(month, 1).isoformat()
    name = partition_name(month)
    # Values are generated dates, never user text: safe to inline (DDL takes no parameters).
    conn.execute(
        text(
            "CREATE TEMP TABLE _attendance_moved ON COMMIT DROP AS "  # noqa: S608 - dates
            "WITH moved AS (DELETE FROM attendance_default "
            f"WHERE at >= '{lo} 00:00+00' AND at < '{hi} 00:00+00' RETURNING *) "
            "SELECT * FROM moved"
        )
    )
    conn.execute(
        text(
            f"CREATE TABLE {name} PARTITION OF attendance "
            f"FOR VALUES FROM ('{lo} 00:00+00') TO ('{hi} 00:00+00')"
        )
    )
    moved = conn.execute(text("INSERT INTO attendance SELECT * FROM _attendance_moved")).rowcount
    conn.execute(text("DROP TABLE _attendance_moved"))
    _LOGGER.info("created partition %s (moved %d rows from the default partition)", name, moved)


def ensure_months(engine: Engine, months: Iterable[date], now: datetime | None = None,
                  known: AppState | None = None) -> int:
    """Create the partitions of ``months`` that are missing; returns how many were made.
    ``known``: the app's state, whose set of months known to exist saves the check."""
    if engine.dialect.name != "postgresql":
        return 0
    current = month_start(now or datetime.now(UTC))
    lo, hi = add_months(current, -MAX_PAST_MONTHS), add_months(current, MAX_FUTURE_MONTHS)
    wanted = {m for m in months if lo <= m <= hi}
    missing = wanted
    if known is not None:
        with known.partitions_lock:
            missing = wanted - known.partitions
    if not missing:
        return 0
    made = 0
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        have = existing_months(conn)
        for month in sorted(missing - have):
            _create(conn, month)
            made += 1
        have |= missing
    if known is not None:
        with known.partitions_lock:
            known.partitions.update(have)
    return made


def ensure_ahead(engine: Engine, months_ahead: int, now: datetime | None = None,
                 known: AppState | None = None) -> int:
    """On start: the previous month, this month and ``months_ahead`` months after it."""
    current = month_start(now or datetime.now(UTC))
    return ensure_months(engine, [add_months(current, i) for i in range(-1, months_ahead + 1)],
                         now, known)
