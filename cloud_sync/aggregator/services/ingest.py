"""Ingest: attendance batches, heartbeats and events from devices (HTTP and MQTT alike).

Every function takes the device id the caller authenticated (an API key over HTTP, the topic
over MQTT) and refuses data claiming another device or room. ``ingest_batch`` never raises on
bad records: each one is rejected with a reason and the rest are stored; the one exception is a
batch whose every record names the same room other than the device's (the device is configured
for a room it is not registered to): ``RoomMismatchError`` (403 ``room_mismatch``) for the
whole batch, so the device keeps the records instead of parking them. It is idempotent on
the records' keys (bulk ``INSERT ... ON CONFLICT DO NOTHING RETURNING``).

Clock correction. A record made while the device clock was not synchronised
(``clock_synced=False``) is placed in time by the heartbeats of the same boot:

1. a heartbeat of that boot sent with a synchronised clock and a monotonic reading gives
   ``at = hb.sent_at - (hb.monotonic_s - record.monotonic_s)`` (``correction='heartbeat_sync'``);
2. else a heartbeat of that boot (preferring unsynchronised ones: the same wrong clock) gives the
   offset ``hb.received_at - hb.sent_at``, and ``at = seen_at + offset``
   (``'heartbeat_offset'``);
3. else ``at = seen_at`` and the record is flagged ``time_uncertain`` (``'uncertain'``); a later
   heartbeat of that boot re-corrects it (and a synchronised one upgrades offset-corrected
   records). The course a record counts for is decided on ``at``.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Connection, bindparam, false, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloud_sync.aggregator import metrics
from cloud_sync.aggregator.db import partitions
from cloud_sync.aggregator.db.models import (
    Attendance,
    DeadLetter,
    Device,
    EventRow,
    RecordDescriptor,
    Room,
    Student,
)
from cloud_sync.aggregator.db.models import Heartbeat as HeartbeatRow
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import group_commit, live
from cloud_sync.aggregator.services.common import (
    ForbiddenError,
    NotFoundError,
    RoomMismatchError,
    ServiceError,
    utcnow,
)
from cloud_sync.aggregator.services.timetable import Timetable, room_timetable
from cloud_sync.aggregator.state import AppState, state_of
from cloud_sync.protocol import (
    LEGACY_EMBEDDER,
    AttendanceBatch,
    AttendanceRecord,
    BatchResult,
    Event,
    Heartbeat,
    RecordRejection,
)

_LOGGER = logging.getLogger(__name__)
# Device times outside this range are refused (a clock stuck at the epoch is still accepted).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
MAX_INT32 = 2**31 - 1
DEFAULT_EARLY_ARRIVAL_MIN = 10.0
EARLY_ARRIVAL_INFO_KEY = "early_arrival_min"  # sessionmaker(info=...) set by create_app


@dataclass(frozen=True, slots=True)
class _Beat:
    sent_at: datetime
    received_at: datetime
    clock_synced: bool
    monotonic_s: float | None


@dataclass(frozen=True, slots=True)
class _DeviceContext:
    device_id: str
    room_id: str
    timetable: Timetable


def _device_context(session: Session, device_id: str) -> _DeviceContext | None:
    """The device's room and the room's timetable, cached in the app's state (state.py)."""
    state = state_of(session)
    found = state.device_contexts.get(device_id) if state is not None else None
    if found is not None:
        return found  # type: ignore[no-any-return]
    row = session.execute(
        select(Device.id, Room).join(Room, Room.id == Device.room_id)
        .where(Device.id == device_id)
    ).first()
    if row is None:
        return None
    context = _DeviceContext(row[0], row[1].id, room_timetable(session, row[1]))
    if state is not None:
        state.device_contexts.put(device_id, context)
    return context


def cached_device(state: AppState, device_id: str) -> _DeviceContext | None:
    """The device's room and timetable if this process has them cached (no database)."""
    return state.device_contexts.get(device_id)  # type: ignore[no-any-return]


def _early_min(session: Session) -> float:
    return float(session.info.get(EARLY_ARRIVAL_INFO_KEY, DEFAULT_EARLY_ARRIVAL_MIN))


def _beats(session: Session | Connection, device_id: str,
           boot_ids: set[str]) -> dict[str, list[_Beat]]:
    if not boot_ids:
        return {}
    rows = session.execute(
        select(
            HeartbeatRow.boot_id, HeartbeatRow.sent_at, HeartbeatRow.received_at,
            HeartbeatRow.clock_synced, HeartbeatRow.monotonic_s,
        ).where(HeartbeatRow.device_id == device_id, HeartbeatRow.boot_id.in_(boot_ids))
        .order_by(HeartbeatRow.received_at)
    ).all()
    out: dict[str, list[_Beat]] = {}
    for boot, sent, received, synced, mono in rows:
        out.setdefault(boot, []).append(_Beat(sent, received, synced, mono))
    return out


def correct_time(
    seen_at: datetime, clock_synced: bool, monotonic_s: float | None, beats: Sequence[_Beat]
) -> tuple[datetime, str]:
    """(time the record counts at, correction method); see the module docstring."""
    if clock_synced:
        return seen_at, "none"
    if monotonic_s is not None:
        synced = [b for b in beats if b.clock_synced and b.monotonic_s is not None]
        if synced:
            ref = min(synced, key=lambda b: abs(b.monotonic_s - monotonic_s))  # type: ignore[operator]
            return ref.sent_at - timedelta(seconds=ref.monotonic_s - monotonic_s), "heartbeat_sync"  # type: ignore[operator]
    if beats:
        unsynced = [b for b in beats if not b.clock_synced] or list(beats)
        if monotonic_s is not None and all(b.monotonic_s is not None for b in unsynced):
            ref = min(unsynced, key=lambda b: abs(b.monotonic_s - monotonic_s))  # type: ignore[operator]
        else:
            ref = unsynced[-1]
        return seen_at + (ref.received_at - ref.sent_at), "heartbeat_offset"
    return seen_at, "uncertain"


def _time_ok(value: datetime | None) -> bool:
    return value is None or EARLIEST <= value < LATEST


def _text_ok(*values: str | None) -> bool:
    return not any(v is not None and "\x00" in v for v in values)


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def _reject_all(batch: AttendanceBatch, reason: str) -> BatchResult:
    metrics.RECORDS.labels("rejected").inc(len(batch.records))
    return BatchResult(
        batch_id=batch.batch_id, accepted=0, duplicate=0,
        rejected=[RecordRejection(key=str(r.key), reason=reason) for r in batch.records],
    )


def _row(
    rec: AttendanceRecord, device: _DeviceContext, at: datetime, method: str,
    course_id: str | None, received: datetime,
) -> dict[str, Any]:
    return {
        "key": rec.key, "student_id": rec.student_id, "course_id": course_id,
        "device_course_id": rec.course_id, "room_id": device.room_id,
        "device_id": device.device_id,
        "at": at, "seen_at": rec.seen_at, "received_at": received,
        "confidence": rec.confidence, "distance": rec.distance,
        "clock_synced": rec.clock_synced, "boot_id": rec.boot_id, "monotonic_s": rec.monotonic_s,
        "time_uncertain": method == "uncertain", "correction": method,
    }


_COLUMNS = (
    "key", "student_id", "course_id", "device_course_id", "room_id", "device_id", "at",
    "seen_at", "received_at", "confidence", "distance", "clock_synced", "boot_id", "monotonic_s",
    "time_uncertain", "correction",
)
_COPY_SQL = f"COPY attendance ({', '.join(_COLUMNS)}) FROM STDIN"


_CLAIM_SQL = (
    "INSERT INTO attendance_keys (key) SELECT unnest(%s::uuid[]) "
    "ON CONFLICT DO NOTHING RETURNING key"
)


def _claim_keys(conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PostgreSQL: claim the keys in attendance_keys (one statement, one array parameter);
    returns the rows whose key was new."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(_CLAIM_SQL, [[r["key"] for r in rows]])
        new = {key for (key,) in cursor.fetchall()}
    finally:
        cursor.close()
    return [r for r in rows if r["key"] in new]


def _copy_rows(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: COPY the new rows (less client CPU than a multi-row INSERT even for 10
    rows: no statement to build); the keys were already claimed in attendance_keys, so no
    conflict is possible here."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(_COPY_SQL) as copy:
            for row in rows:
                copy.write_row([row[c] for c in _COLUMNS])
    finally:
        cursor.close()


_DESCRIPTORS = RecordDescriptor.__table__
_DESCRIPTOR_INSERT = {
    "postgresql": pg_insert(_DESCRIPTORS).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(_DESCRIPTORS).on_conflict_do_nothing(),
}
_SQLITE_RECORD_INSERT = (
    sqlite_insert(Attendance.__table__)
    .on_conflict_do_nothing(index_elements=["key"])
    .returning(Attendance.__table__.c.key)
)
_KNOWN_STUDENTS = select(Student.id).where(Student.id.in_(bindparam("ids", expanding=True)))
DESCRIPTOR_DAYS_INFO_KEY = "record_descriptor_days"


SMALL_BATCH_ROWS = 20
_COLUMN_TYPES = {
    "key": "uuid", "student_id": "text", "course_id": "text", "device_course_id": "text",
    "room_id": "text", "device_id": "text", "at": "timestamptz", "seen_at": "timestamptz",
    "received_at": "timestamptz", "confidence": "float8", "distance": "float8",
    "clock_synced": "bool", "boot_id": "text", "monotonic_s": "float8",
    "time_uncertain": "bool", "correction": "text",
}
# PostgreSQL, a small batch: claim the keys, insert the rows whose key was new and keep the
# descriptors in one statement (one round trip; the COPY path takes three or more).
_ARRAYS = ", ".join(f"%({c})s::{_COLUMN_TYPES[c]}[]" for c in _COLUMNS)
_PG_SMALL_INSERT = (
    "WITH claimed AS (INSERT INTO attendance_keys (key) "  # noqa: S608 - constants
    "SELECT unnest(%(key)s::uuid[]) ON CONFLICT DO NOTHING RETURNING key), "
    f"ins AS (INSERT INTO attendance ({', '.join(_COLUMNS)}) SELECT r.* FROM "
    f"unnest({_ARRAYS}) AS r({', '.join(_COLUMNS)}) "
    "WHERE r.key IN (SELECT key FROM claimed) RETURNING key), "
    "kept AS (INSERT INTO record_descriptors (key, received_at, embedder, vector) "
    "SELECT * FROM unnest(%(d_key)s::uuid[], %(d_received_at)s::timestamptz[], "
    "%(d_embedder)s::text[], %(d_vector)s::bytea[]) ON CONFLICT DO NOTHING) "
    "SELECT key FROM ins"
)


def _pg_insert_small(conn: Connection, rows: list[dict[str, Any]],
                     descriptors: list[dict[str, Any]]) -> set[uuid.UUID]:
    """The keys inserted (see _PG_SMALL_INSERT)."""
    params: dict[str, Any] = {c: [r[c] for r in rows] for c in _COLUMNS}
    for column in ("key", "received_at", "embedder", "vector"):
        params[f"d_{column}"] = [d[column] for d in descriptors]
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(_PG_SMALL_INSERT, params)
        return {key for (key,) in cursor.fetchall()}
    finally:
        cursor.close()


def _descriptor_rows(records: list[AttendanceRecord],
                     received: datetime) -> list[dict[str, Any]]:
    """The descriptors the devices matched, kept in ``record_descriptors`` in the batch's own
    transaction (idempotent on the record key: a re-sent batch fills any gap)."""
    return [{"key": r.key, "received_at": received,
             "embedder": r.descriptor_embedder or LEGACY_EMBEDDER,
             "vector": np.asarray(r.descriptor, dtype="<f4").tobytes()}
            for r in records if r.descriptor is not None]


@dataclass
class PreparedBatch:
    """What the checks that need no database left of a batch (see :func:`prepare_batch`)."""

    device: _DeviceContext
    batch: AttendanceBatch
    candidates: list[AttendanceRecord]
    rejected: list[RecordRejection]
    duplicate: int
    received: datetime


@dataclass(frozen=True, slots=True)
class _NeedPartitions:
    """A batch job's answer when a record's month has no attendance partition known to
    exist (PostgreSQL): nothing was written; make them and submit again."""

    months: frozenset[date]


def prepare_batch(device: _DeviceContext | None, device_id: str,
                  batch: AttendanceBatch) -> PreparedBatch | BatchResult:
    """The checks without the database: the device, the records' device and room, times and
    text, keys repeated inside the batch. A BatchResult when nothing is left to store."""
    if device is None:
        return _reject_all(batch, f"unknown device {device_id!r}")
    if batch.device_id != device_id:
        return _reject_all(
            batch, f"batch device_id {batch.device_id!r} is not the authenticated device"
        )
    rooms = {rec.room_id for rec in batch.records}
    if len(rooms) == 1 and device.room_id not in rooms and all(
            rec.device_id == device_id for rec in batch.records):
        # every record says another room: the device is configured for a room it is not
        # registered to. Refuse the whole batch (403 room_mismatch): the device keeps its
        # records until an operator fixes the config or the registration, none is parked.
        raise RoomMismatchError(device_id, device.room_id, rooms.pop())
    rejected: list[RecordRejection] = []
    candidates: list[AttendanceRecord] = []
    seen: set[uuid.UUID] = set()
    duplicate = 0
    for rec in batch.records:
        if rec.device_id != device_id:
            rejected.append(RecordRejection(
                key=str(rec.key),
                reason=f"device_id {rec.device_id!r} is not the authenticated device",
            ))
        elif rec.room_id != device.room_id:
            rejected.append(RecordRejection(
                key=str(rec.key), reason=f"room mismatch: room_id {rec.room_id!r} is not "
                f"the device's room {device.room_id!r}",
            ))
        elif not _time_ok(rec.seen_at):
            rejected.append(RecordRejection(
                key=str(rec.key), reason="seen_at outside 1970..2100",
            ))
        elif not _text_ok(rec.boot_id) or (rec.monotonic_s or 0) > 1e12:
            rejected.append(RecordRejection(
                key=str(rec.key), reason="invalid boot_id or monotonic_s",
            ))
        elif rec.key in seen:
            duplicate += 1
        else:
            seen.add(rec.key)
            candidates.append(rec)
    return PreparedBatch(device, batch, candidates, rejected, duplicate, utcnow())


@dataclass(frozen=True, slots=True)
class _Stored:
    rows: list[dict[str, Any]]
    fresh: set[uuid.UUID]
    unknown: list[RecordRejection]


def batch_job(prepared: PreparedBatch, early_min: float, keep_descriptors: bool,
              known: AppState | None, checked: frozenset[date] = frozenset()
              ) -> group_commit.Job:
    """The write of a prepared batch, for the group committer, all in its transaction: the
    students that exist, this boot's heartbeats for records made with an unsynchronised clock,
    each record's time and course, the insert of the new keys (idempotent) and the
    descriptors. On PostgreSQL a record in a month whose partition is neither in ``known``
    nor ``checked`` makes the job write nothing and answer _NeedPartitions."""
    device, candidates = prepared.device, prepared.candidates

    def job(conn: Connection) -> _Stored | _NeedPartitions:
        wanted = {r.student_id for r in candidates}
        students = set(conn.execute(_KNOWN_STUDENTS, {"ids": list(wanted)}).scalars()
                       ) if wanted else set()
        beats = _beats(conn, device.device_id,
                       {r.boot_id for r in candidates if not r.clock_synced and r.boot_id})
        rows: list[dict[str, Any]] = []
        unknown: list[RecordRejection] = []
        for rec in candidates:
            if rec.student_id not in students:
                unknown.append(RecordRejection(
                    key=str(rec.key), reason=f"unknown student {rec.student_id!r}"))
                continue
            at, method = correct_time(
                rec.seen_at, rec.clock_synced, rec.monotonic_s,
                beats.get(rec.boot_id or "", []) if rec.boot_id else [])
            course_id = device.timetable.course_at(device.room_id, at, early_min)
            rows.append(_row(rec, device, at, method, course_id, prepared.received))
        postgres = conn.dialect.name == "postgresql"
        if postgres and rows:
            months = {partitions.month_start(r["at"]) for r in rows} - checked
            if known is not None and months:
                with known.partitions_lock:
                    months -= known.partitions
            if months:
                return _NeedPartitions(frozenset(months))
        kept = {r["key"] for r in rows}
        descriptors = _descriptor_rows([r for r in candidates if r.key in kept],
                                       prepared.received) if keep_descriptors else []
        fresh: set[uuid.UUID] = set()
        if rows and postgres and len(rows) <= SMALL_BATCH_ROWS:
            return _Stored(rows, _pg_insert_small(conn, rows, descriptors), unknown)
        if rows and postgres:
            claimed = _claim_keys(conn, rows)
            if claimed:
                _copy_rows(conn, claimed)
            fresh = {r["key"] for r in claimed}
        elif rows:
            fresh = set(conn.execute(_SQLITE_RECORD_INSERT, rows).scalars().all())
        if descriptors:
            conn.execute(_DESCRIPTOR_INSERT[conn.dialect.name], descriptors)
        return _Stored(rows, fresh, unknown)

    return job


def batch_stored(prepared: PreparedBatch, stored: _Stored,
                 feed: live.LiveFeed | None) -> BatchResult:
    """After a batch's job committed: the live feed, the metrics, the answer."""
    accepted = len(stored.fresh)
    duplicate = prepared.duplicate + len(stored.rows) - accepted
    rejected = prepared.rejected + stored.unknown
    if stored.fresh:
        live.publish_records_on(feed, [r for r in stored.rows if r["key"] in stored.fresh])
    metrics.RECORDS.labels("accepted").inc(accepted)
    metrics.RECORDS.labels("duplicate").inc(duplicate)
    metrics.RECORDS.labels("rejected").inc(len(rejected))
    if rejected:
        _LOGGER.info("device %s: %d record(s) rejected, first: %s", prepared.device.device_id,
                     len(rejected), rejected[0].reason)
    return BatchResult(batch_id=prepared.batch.batch_id, accepted=accepted,
                       duplicate=duplicate, rejected=rejected)


def ingest_batch(session: Session, device_id: str, batch: AttendanceBatch) -> BatchResult:
    """Store a device's batch; see the module docstring. Durable when this returns (call it
    on a fresh session). Raises ``RoomMismatchError`` when the whole batch names another
    room."""
    prepared = prepare_batch(_device_context(session, device_id), device_id, batch)
    if isinstance(prepared, BatchResult):
        session.rollback()
        return prepared
    if not prepared.candidates:
        session.rollback()
        return batch_stored(prepared, _Stored([], set(), []), live.feed_of(session))
    state = state_of(session)
    engine = session.get_bind()
    keep = session.info.get(DESCRIPTOR_DAYS_INFO_KEY, 1) > 0
    checked: frozenset[date] = frozenset()
    while True:
        stored = _write(session, batch_job(prepared, _early_min(session), keep, state, checked),
                        len(prepared.candidates))
        if not isinstance(stored, _NeedPartitions):
            return batch_stored(prepared, stored, live.feed_of(session))
        # PostgreSQL: a month without a partition gets one (own connection, outside any
        # write transaction), then the batch is written
        partitions.ensure_months(engine, stored.months, known=state)  # type: ignore[arg-type]
        checked |= stored.months


async def ingest_cached_batch(state: AppState, device: _DeviceContext, device_id: str,
                              batch: AttendanceBatch, early_min: float,
                              keep_descriptors: bool, feed: live.LiveFeed | None
                              ) -> BatchResult | None:
    """:func:`ingest_batch` from the event loop for a device whose context is cached: the
    checks here, the rest in one group-committed job awaited without a thread. None (nothing
    written) when a month's attendance partition must be made first: use ingest_batch."""
    prepared = prepare_batch(device, device_id, batch)
    if isinstance(prepared, BatchResult):
        return prepared
    if not prepared.candidates:
        return batch_stored(prepared, _Stored([], set(), []), feed)
    stored = await state.committer().submit_async(
        batch_job(prepared, early_min, keep_descriptors, state), len(prepared.candidates))
    if isinstance(stored, _NeedPartitions):
        return None
    return batch_stored(prepared, stored, feed)


def _claimed(device: _DeviceContext | None, device_id: str, claimed_device: str,
             room_id: str) -> _DeviceContext:
    """The device's context, once the message's own device and room are checked."""
    if device is None:
        raise NotFoundError(f"unknown device {device_id!r}")
    if claimed_device != device_id:
        raise ForbiddenError(f"device_id {claimed_device!r} is not the authenticated device")
    if room_id != device.room_id:
        raise RoomMismatchError(device_id, device.room_id, room_id)
    return device


def _write(session: Session, job: group_commit.Job, rows: int, order: str = "") -> Any:
    """``job`` in the app's group committer (durable when this returns), or alone without an
    app state. The session's read transaction is ended first."""
    session.rollback()
    state = state_of(session)
    if state is None:
        return group_commit.run_alone(session.get_bind(), job)
    return state.committer().submit(job, rows, order)


_RECORD = Attendance.__table__
_RECORRECT = (
    update(_RECORD)
    .where(_RECORD.c.id == bindparam("_id"), _RECORD.c.at == bindparam("_at"))
    .values(at=bindparam("at"), correction=bindparam("correction"),
            time_uncertain=bindparam("time_uncertain"), course_id=bindparam("course_id"))
)


def _recorrect_methods(hb: Heartbeat) -> list[str]:
    """The corrections a heartbeat can improve: uncertain records, and offset-corrected ones
    when it is synchronised with a monotonic reading."""
    if hb.clock_synced and hb.monotonic_s is not None:
        return ["uncertain", "heartbeat_offset"]
    return ["uncertain"]


def _recorrect(conn: Connection, device: _DeviceContext, hb: Heartbeat, early: float,
               records: Sequence[Any] | None = None) -> int:
    """Re-correct this boot's uncertain records (and offset-corrected ones if ``hb`` is
    synchronised with a monotonic reading) now that the heartbeat is stored (same
    transaction). The partial index ix_attendance_unsynced makes the usual answer, none,
    cheap. ``records``: those rows (id, at, seen_at, monotonic_s, correction, room_id) when
    the caller already read them."""
    if records is None:
        c = _RECORD.c
        records = conn.execute(
            select(c.id, c.at, c.seen_at, c.monotonic_s, c.correction, c.room_id).where(
                c.device_id == device.device_id, c.boot_id == hb.boot_id,
                c.clock_synced == false(), c.correction.in_(_recorrect_methods(hb)),
            )
        ).all()
    if not records:
        return 0
    beats = _beats(conn, device.device_id, {hb.boot_id} if hb.boot_id else set()).get(
        hb.boot_id or "", []
    )
    changes: list[dict[str, Any]] = []
    for rec_id, rec_at, seen_at, monotonic_s, correction, room_id in records:
        at, method = correct_time(seen_at, False, monotonic_s, beats)
        if method == correction and at == rec_at:
            continue
        changes.append({"_id": rec_id, "_at": rec_at, "at": at, "correction": method,
                        "time_uncertain": method == "uncertain",
                        "course_id": device.timetable.course_at(room_id, at, early)})
    if changes:
        conn.execute(_RECORRECT, changes)
    return len(changes)


def heartbeat_job(device: _DeviceContext | None, device_id: str, hb: Heartbeat,
                  early_min: float) -> group_commit.Job:
    """Check a heartbeat (``ServiceError``: values; ``ForbiddenError``: another device or
    room; ``NotFoundError``: an unknown device) and return its write, for the group
    committer: store it, update the device's status and clock offset, and re-correct this
    boot's records made with an unsynchronised clock. The job returns how many records it
    re-corrected; submit it with ``order=device_id`` (it updates the device's row)."""
    received = utcnow()
    if not (_time_ok(hb.sent_at) and _time_ok(hb.last_frame_at)):
        raise ServiceError("sent_at / last_frame_at outside 1970..2100")
    placement = hb.placement
    if hb.outbox_depth > MAX_INT32 or not _text_ok(
            hb.boot_id, hb.software_version, placement.hint if placement else None,
            *(b.size for b in (placement.bands if placement else []))):
        raise ServiceError("outbox_depth too large or text with NUL characters")
    if not all(_finite(v) for v in (hb.monotonic_s, hb.uptime_s, hb.cpu_temp_c, hb.fps,
                                    hb.oldest_unsent_age_s)):
        raise ServiceError("numbers must be finite")
    found = _claimed(device, device_id, hb.device_id, hb.room_id)
    row = {
        "device_id": device_id, "received_at": received, "sent_at": hb.sent_at,
        "clock_synced": hb.clock_synced, "boot_id": hb.boot_id, "monotonic_s": hb.monotonic_s,
        "software_version": hb.software_version, "uptime_s": hb.uptime_s,
        "cpu_temp_c": hb.cpu_temp_c, "outbox_depth": hb.outbox_depth,
        "oldest_unsent_age_s": hb.oldest_unsent_age_s, "last_frame_at": hb.last_frame_at,
        "fps": hb.fps, "placement": placement.model_dump_json() if placement else None,
        "store_unlock": hb.store_unlock.model_dump_json() if hb.store_unlock else None,
    }
    status = {"last_heartbeat_at": received, "software_version": hb.software_version,
              "clock_offset_s": (received - hb.sent_at).total_seconds()}

    def job(conn: Connection) -> int:
        if conn.dialect.name == "postgresql":  # one round trip for the three statements
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(_PG_HEARTBEAT, {**row, **status,
                                               "methods": _recorrect_methods(hb)})
                records = cursor.fetchall()
            finally:
                cursor.close()
            return _recorrect(conn, found, hb, early_min, records) if records else 0
        conn.execute(_HEARTBEAT_INSERT, row)
        conn.execute(_DEVICE_STATUS, {"_id": device_id, **status})
        return _recorrect(conn, found, hb, early_min) if hb.boot_id else 0

    return job


# every column but the id: a column added to the model is written here too (or, missing from
# the job's row, fails loudly)
_HEARTBEAT_COLUMNS = tuple(c.name for c in HeartbeatRow.__table__.columns if c.name != "id")
# PostgreSQL: the heartbeat, the device's status and the search for this boot's records to
# re-correct in one statement (the SELECT does not depend on the two writes).
_PG_HEARTBEAT = (
    f"WITH hb AS (INSERT INTO heartbeats ({', '.join(_HEARTBEAT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(f'%({c})s' for c in _HEARTBEAT_COLUMNS)})), "
    "dev AS (UPDATE devices SET last_heartbeat_at = %(last_heartbeat_at)s, "
    "software_version = %(software_version)s, clock_offset_s = %(clock_offset_s)s "
    "WHERE id = %(device_id)s) "
    "SELECT id, at, seen_at, monotonic_s, correction, room_id FROM attendance "
    "WHERE %(boot_id)s::text IS NOT NULL AND device_id = %(device_id)s "
    "AND boot_id = %(boot_id)s AND clock_synced = false AND correction = ANY(%(methods)s)"
)


_HEARTBEAT_INSERT = insert(HeartbeatRow.__table__)
_DEVICE_STATUS = (
    update(Device.__table__).where(Device.__table__.c.id == bindparam("_id"))
    .values(last_heartbeat_at=bindparam("last_heartbeat_at"),
            software_version=bindparam("software_version"),
            clock_offset_s=bindparam("clock_offset_s"))
)


def heartbeat_stored(device_id: str, hb: Heartbeat, changed: int) -> None:
    """After a heartbeat's job committed: the log line and the metric."""
    if changed:
        _LOGGER.info("device %s boot %s: %d record time(s) corrected", device_id, hb.boot_id,
                     changed)
    metrics.HEARTBEATS.inc()


def record_heartbeat(session: Session, device_id: str, hb: Heartbeat) -> None:
    """Store a heartbeat (see :func:`heartbeat_job`); durable when this returns. Raises
    ``ForbiddenError`` when the heartbeat claims another device or room, ``NotFoundError`` for
    an unknown device, ``ServiceError`` for values out of range."""
    job = heartbeat_job(_device_context(session, device_id), device_id, hb,
                        _early_min(session))
    heartbeat_stored(device_id, hb, _write(session, job, 1, order=device_id))


def event_job(device: _DeviceContext | None, device_id: str,
              event: Event) -> group_commit.Job:
    """Check an event (``ServiceError``, ``ForbiddenError``, ``NotFoundError`` as for a
    heartbeat) and return its write for the group committer; the job returns whether the
    event was new (False: its key was already stored, a re-send)."""
    if not _time_ok(event.at):
        raise ServiceError("at outside 1970..2100")
    if not _text_ok(event.message):
        raise ServiceError("message contains NUL characters")
    try:
        plain = json.dumps(event.data, allow_nan=False)
    except ValueError as err:
        raise ServiceError(f"data is not plain JSON: {err}") from err
    if "\\u0000" in plain:
        raise ServiceError("data contains NUL characters")
    _claimed(device, device_id, event.device_id, event.room_id)
    values = {
        "key": event.key, "device_id": device_id, "room_id": event.room_id, "kind": event.kind,
        "severity": event.severity, "message": event.message, "at": event.at,
        "received_at": utcnow(), "data": event.data, "session_id": event.session_id,
        "v": event.v,
    }

    def job(conn: Connection) -> bool:
        stmt = _EVENT_INSERT[conn.dialect.name == "postgresql"]
        return conn.execute(stmt, values).first() is not None

    return job


_EVENTS = EventRow.__table__
_EVENT_INSERT = (
    sqlite_insert(_EVENTS).on_conflict_do_nothing().returning(_EVENTS.c.key),
    pg_insert(_EVENTS).on_conflict_do_nothing().returning(_EVENTS.c.key),
)


def event_stored(feed: live.LiveFeed | None, event: Event, inserted: bool) -> None:
    """After an event's job committed: the metric, and a new event to the live feed."""
    metrics.EVENTS.labels(event.kind).inc()
    if inserted:
        live.publish_event_on(feed, event)


def record_event(session: Session, device_id: str, event: Event) -> bool:
    """Store an event; False when its key was already stored (a re-send). Durable when this
    returns."""
    job = event_job(_device_context(session, device_id), device_id, event)
    inserted = bool(_write(session, job, 1))
    event_stored(live.feed_of(session), event, inserted)
    return inserted


@dataclass(frozen=True, slots=True)
class DeadLetterLimits:
    """What a dead letter may cost: the payload bytes kept, and the table's rows and age."""

    keep_bytes: int = 4096
    max_rows: int = 10_000
    max_age_days: float = 30.0


def record_dead_letter(session: Session, source: str, payload: bytes, reason: str,
                       limits: DeadLetterLimits | None = None) -> None:
    """Keep a message that could not be processed (for the MQTT bridge): its first
    ``keep_bytes`` (the reason says how large it was), then prune the table to ``max_rows``
    rows and ``max_age_days``, oldest first. Commits."""
    limits = limits or DeadLetterLimits()
    if len(payload) > limits.keep_bytes:
        reason = f"{reason} [payload {len(payload)} bytes, first {limits.keep_bytes} kept]"
    begin_write(session)
    session.add(DeadLetter(source=source[:200], payload=payload[:limits.keep_bytes],
                           reason=reason[:2000], received_at=utcnow()))
    session.flush()
    table = DeadLetter.__table__
    session.execute(table.delete().where(
        table.c.received_at < utcnow() - timedelta(days=limits.max_age_days)))
    newest_dropped = session.scalar(
        select(table.c.id).order_by(table.c.id.desc()).offset(limits.max_rows).limit(1))
    if newest_dropped is not None:
        session.execute(table.delete().where(table.c.id <= newest_dropped))
    session.commit()
    metrics.DEAD_LETTERS.inc()
