"""The appliance's local SQLite store: the outbox of attendance records and events, the
schedule/roster cache and a small key/value state table.

One file (``data_dir/appliance.db``), WAL journal with ``synchronous=FULL`` so that a record is on
disk once :meth:`Store.add_record` returns (a SIGKILL or power cut right after loses nothing).
One connection shared by every thread, serialised by a lock: the write rate is a few rows a
minute, so a lock is simpler and cheaper than a connection per thread.

Encrypted at rest (docs/PRIVACY.md, the device at rest): with a key the file, its WAL and
every page written are SQLCipher 4 (AES-256, HMAC per page; the ``sqlcipher3-wheels``
driver, a drop-in ``sqlite3``), so a copy of the SD card reads as noise. The key comes from
the aggregator at start and is kept in memory only (appliance/runtime.py); until it arrives the
store is *locked*: every call raises :class:`StoreLockedError`. An unencrypted store from
before is converted on the first unlock without losing a row (:func:`encrypt_plain_file`).

Also here: the device-clock helpers every record carries (:func:`clock_synced`,
:func:`boot_id`), so the aggregator can correct records from a device whose clock was wrong.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlcipher3 import dbapi2 as sqlcipher

from cloud_sync.protocol import AttendanceRecord, Event, ScheduleResponse

_LOGGER = logging.getLogger(__name__)

KEY_BYTES = 32
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every unencrypted SQLite file
# What a store call can raise: the stdlib's errors (other SQLite files) and SQLCipher's.
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, sqlcipher.Error)


class StoreLockedError(sqlcipher.OperationalError):
    """The store is encrypted and its key has not arrived: nothing is read or written."""


class StoreKeyError(sqlcipher.DatabaseError):
    """The key does not open the file (another key's store, or not a database)."""

DB_FILENAME = "appliance.db"
DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")  # Store(path): a file with one of these, else a dir
_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
_SYSTEMD_BOOTED = Path("/run/systemd/system")
_TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
_CLOCK_CACHE_S = 30.0
_clock_cache: tuple[float, bool] | None = None
_clock_lock = threading.Lock()


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime) -> str:
    """UTC ISO 8601 with microseconds: sorts correctly as text."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def boot_id() -> str | None:
    """The kernel's id of the current boot (Linux), or None where there is none."""
    try:
        return _BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None


def _query_clock_synced() -> bool:
    if not _SYSTEMD_BOOTED.is_dir():
        # Not a systemd machine (a container or a developer's box): nothing can tell us,
        # and such a machine's clock is normally synchronised by its host.
        return True
    if shutil.which("timedatectl"):
        try:
            out = subprocess.run(
                ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                capture_output=True, text=True, timeout=2, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip() in {"yes", "no"}:
            return out.stdout.strip() == "yes"
    # On a device (systemd) an unknown answer means "not synchronised".
    return _TIMESYNC_FLAG.exists()


def clock_synced() -> bool:
    """Whether the wall clock is NTP-synchronised.

    On a systemd machine (a device): ``timedatectl show -p NTPSynchronized --value``, else the
    flag file systemd-timesyncd writes (``/run/systemd/timesync/synchronized``); unknown counts
    as not synchronised. On a machine not booted with systemd (development, containers) the
    clock is assumed synchronised. The answer is cached for 30 s.
    """
    global _clock_cache
    with _clock_lock:
        now = time.monotonic()
        if _clock_cache is not None and now - _clock_cache[0] < _CLOCK_CACHE_S:
            return _clock_cache[1]
        value = _query_clock_synced()
        _clock_cache = (now, value)
        return value


@dataclass(frozen=True, slots=True)
class WriteFailure:
    """The last write to the store that failed (and nothing written since): what, when, why."""

    what: str
    at: datetime
    error: str  # the SQLite/OS error text (no personal data: e.g. "database or disk is full")

    @property
    def disk_full(self) -> bool:
        return "full" in self.error.lower() or "no space" in self.error.lower()


def _header(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return b""


def _key_pragma(key: bytes) -> str:
    """SQLCipher's raw-key form (no passphrase derivation: the key is 256 random bits)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"a store key is {KEY_BYTES} bytes, not {len(key)}")
    return f"\"x'{key.hex()}'\""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shred(path: Path) -> None:
    """Overwrite a file with zeros, fsync, delete (on flash, wear levelling may keep old
    blocks: docs/PRIVACY.md says so)."""
    try:
        size = path.stat().st_size
        with path.open("r+b") as fh:
            fh.write(b"\0" * size)
            fh.flush()
            os.fsync(fh.fileno())
    except FileNotFoundError:
        return
    path.unlink()


def _row_counts(conn: Any, schema: str = "main") -> dict[str, int]:
    tables = [r[0] for r in conn.execute(
        f"SELECT name FROM {schema}.sqlite_master WHERE type = 'table'")]  # noqa: S608
    return {t: conn.execute(f'SELECT count(*) FROM {schema}."{t}"').fetchone()[0]  # noqa: S608
            for t in tables}


def encrypt_plain_file(path: Path, key: bytes) -> bool:
    """Convert an unencrypted store at ``path`` into an encrypted one, in place; True if it
    did. Crash-safe at every step: the encrypted copy is written beside it and checked (same
    rows in every table), the plaintext is kept under a second name (a hard link) while the
    copy takes its name (one rename), then zeroed and deleted. A run interrupted anywhere is
    finished or undone by the next call; no row is lost."""
    plain = path.with_name(path.name + ".plaintext")
    tmp = path.with_name(path.name + ".encrypting")
    if plain.exists():
        if path.exists() and os.path.samefile(plain, path):
            plain.unlink()  # stopped before the swap: the store is still the plaintext file
        else:
            _shred(plain)  # stopped after the swap: only the old copy is left to destroy
    tmp.unlink(missing_ok=True)
    if _header(path) != SQLITE_HEADER:
        return False
    src = sqlcipher.connect(str(path), isolation_level=None)
    try:
        src.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        src.execute(f"ATTACH DATABASE ? AS enc KEY {_key_pragma(key)}", (str(tmp),))
        src.execute("SELECT sqlcipher_export('enc')")
        version = int(src.execute("PRAGMA user_version").fetchone()[0])
        src.execute(f"PRAGMA enc.user_version = {version}")
        if _row_counts(src, "enc") != _row_counts(src):
            raise StoreKeyError(f"encrypting {path}: the copy's rows differ; kept unencrypted")
        src.execute("DETACH DATABASE enc")
    finally:
        src.close()
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.link(path, plain)
    os.replace(tmp, path)
    for suffix in ("-wal", "-shm"):  # the plaintext's; the encrypted file makes its own
        _shred(path.with_name(path.name + suffix))
    _fsync_dir(path.parent)
    _shred(plain)
    _fsync_dir(path.parent)
    _LOGGER.warning("store: %s converted to an encrypted store (the unencrypted file was "
                    "overwritten and deleted)", path)
    return True


class Store:
    """Outbox, caches and state of one appliance, in one SQLite file. Thread-safe.

    ``path``: the database file (``*.db``, ``*.sqlite``, ``*.sqlite3``) or the data directory
    (the file is then ``path/appliance.db``). ``key`` (32 bytes): the file is encrypted with
    it (an unencrypted one is converted first); None: plain SQLite. ``locked``: open nothing
    yet, every call raises :class:`StoreLockedError` with this reason until :meth:`unlock`."""

    def __init__(self, path: Path, key: bytes | None = None, *, locked: str | None = None) -> None:
        path = Path(path)
        if path.suffix.lower() not in DB_SUFFIXES:  # a data directory
            path = path / DB_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self.write_failure: WriteFailure | None = None  # set while writes fail (health)
        self._cx: Any = None
        self._sdb: sqlite_utils.Database | None = None
        self.encrypted = False
        self.lock_reason: str | None = locked
        self.locked_since: datetime | None = _utcnow() if locked else None
        self.set_aside: Path | None = None  # a store another key made, moved away at unlock
        # how it was unlocked and whether it can be offline (appliance/sync/store_key.py's
        # KeyKeeper.describe): /health, the status page and the heartbeat read it
        self.unlock_info: Callable[[], dict[str, Any]] | None = None
        if locked is None:
            self._open(key)

    @property
    def _conn(self) -> Any:
        if self._cx is None:
            raise StoreLockedError(f"store locked: {self.lock_reason or 'closed'}")
        return self._cx

    @property
    def _db(self) -> sqlite_utils.Database:
        if self._sdb is None:
            raise StoreLockedError(f"store locked: {self.lock_reason or 'closed'}")
        return self._sdb

    @property
    def locked(self) -> bool:
        return self._cx is None

    def _open(self, key: bytes | None) -> None:
        if key is not None:
            encrypt_plain_file(self.path, key)
        # autocommit mode: every statement outside an explicit `with conn:` commits at once.
        conn = sqlcipher.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                 timeout=30)
        try:
            if key is not None:
                conn.execute(f"PRAGMA key = {_key_pragma(key)}")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlcipher.DatabaseError as err:
            conn.close()
            raise StoreKeyError(
                f"{self.path} does not open {'with this key' if key else 'without a key'} "
                f"({err})") from err
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # Deleted rows (rosters with face descriptors) are overwritten, not left in free pages.
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        self._cx = conn
        self._sdb = sqlite_utils.Database(conn)
        self.encrypted = key is not None
        self._create_schema()

    def unlock(self, key: bytes, *, set_aside: bool = True) -> None:
        """Open the encrypted store with ``key`` (from the aggregator). A store this key does
        not open was made with another key (the device was deleted and registered again: the
        old key is gone, so is every way to read it): it is moved aside as
        ``appliance.db.unreadable-<time>`` and a new store begins. ``set_aside=False`` (a key
        from the card, not the aggregator): :class:`StoreKeyError` instead, nothing moved."""
        with self._lock:
            if self._cx is not None:
                return
            try:
                self._open(key)
            except StoreKeyError as err:
                if not set_aside:
                    raise
                stamp = _utcnow().strftime("%Y%m%dT%H%M%SZ")
                aside = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
                _LOGGER.error("store: %s; moved aside as %s (without its key it is noise) and "
                              "a new store begins", err, aside.name)
                for suffix in ("", "-wal", "-shm"):
                    src = self.path.with_name(self.path.name + suffix)
                    if src.exists():
                        os.replace(src, aside.with_name(aside.name + suffix))
                self.set_aside = aside
                self._open(key)
            self.lock_reason = None
            self.locked_since = None

    # -- schema -------------------------------------------------------------------------------
    def _create_schema(self) -> None:
        db = self._db
        with self._lock:
            db["records"].create(
                {
                    "key": str, "student_id": str, "course_id": str, "room_id": str,
                    "device_id": str, "seen_at": str, "payload": str, "created_at": str,
                    "sent_at": str, "parked_reason": str,
                },
                pk="key", not_null={"student_id", "seen_at", "payload", "created_at"},
                if_not_exists=True,
            )
            db["events"].create(
                {
                    "key": str, "kind": str, "at": str, "payload": str, "created_at": str,
                    "sent_at": str, "parked_reason": str,
                },
                pk="key", not_null={"kind", "at", "payload", "created_at"}, if_not_exists=True,
            )
            db["schedules"].create(
                {"day": str, "payload": str, "etag": str, "saved_at": str},
                pk="day", if_not_exists=True,
            )
            db["state"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            db["records"].create_index(["sent_at", "parked_reason", "created_at"],
                                       if_not_exists=True)
            db["records"].create_index(["seen_at"], if_not_exists=True)
            db["events"].create_index(["sent_at", "parked_reason", "created_at"],
                                      if_not_exists=True)

    def close(self) -> None:
        with self._lock:
            if self._cx is not None:
                self._cx.close()
                self._cx = self._sdb = None
                self.lock_reason = "closed"

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Remember a failed write (a full disk: "database or disk is full") until the next
        write succeeds, for /health; the error still goes to the caller."""
        try:
            yield
        except StoreLockedError:
            raise  # not a failing disk: /health says why it is locked
        except (*STORE_ERRORS, OSError) as err:
            if self.write_failure is None:
                _LOGGER.error("store: writing %s failed: %s", what, err)
            self.write_failure = WriteFailure(what, _utcnow(), f"{type(err).__name__}: {err}")
            raise
        if self.write_failure is not None:
            _LOGGER.warning("store: writes work again (%s)", what)
            self.write_failure = None

    # -- outbox ---------------------------------------------------------------------------------
    @staticmethod
    def _record_row(record: AttendanceRecord) -> dict[str, str | None]:
        return {
            "key": str(record.key), "student_id": record.student_id,
            "course_id": record.course_id, "room_id": record.room_id,
            "device_id": record.device_id, "seen_at": _iso(record.seen_at),
            "payload": record.model_dump_json(), "created_at": _iso(_utcnow()),
            "sent_at": None, "parked_reason": None,
        }

    def add_record(self, record: AttendanceRecord) -> None:
        """Append a record to the outbox; durable once this returns. Same key twice: ignored."""
        with self._writing("a record"), self._lock:
            self._db["records"].insert(self._record_row(record), ignore=True)

    def add_records(self, records: Iterable[AttendanceRecord]) -> None:
        """Append many records in one transaction (one fsync); durable once this returns."""
        rows = [self._record_row(r) for r in records]
        with self._writing("records"), self._lock, self._conn:
            self._db["records"].insert_all(rows, ignore=True, batch_size=500)

    def add_event(self, event: Event) -> None:
        """Append an event to the outbox; durable once this returns. Same key twice: ignored."""
        row = {
            "key": str(event.key), "kind": event.kind, "at": _iso(event.at),
            "payload": event.model_dump_json(), "created_at": _iso(_utcnow()),
            "sent_at": None, "parked_reason": None,
        }
        with self._writing("an event"), self._lock:
            self._db["events"].insert(row, ignore=True)

    def _unsent(self, table: str, limit: int) -> list[str]:
        sql = (f"SELECT payload FROM {table} WHERE sent_at IS NULL AND parked_reason IS NULL "  # noqa: S608
               "ORDER BY created_at, rowid LIMIT ?")
        with self._lock:
            return [row[0] for row in self._conn.execute(sql, (max(0, limit),))]

    def unsent_records(self, limit: int) -> list[AttendanceRecord]:
        """Records not yet acknowledged and not parked, oldest first."""
        return [AttendanceRecord.model_validate_json(p) for p in self._unsent("records", limit)]

    def unsent_events(self, limit: int) -> list[Event]:
        """Events not yet acknowledged and not parked, oldest first."""
        return [Event.model_validate_json(p) for p in self._unsent("events", limit)]

    def mark_sent(self, keys: Iterable[uuid.UUID | str]) -> int:
        """Mark records or events as acknowledged; returns how many rows changed."""
        wanted = [(str(k),) for k in keys]
        if not wanted:
            return 0
        now = _iso(_utcnow())
        changed = 0
        with self._writing("sent marks"), self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            for table in ("records", "events"):
                cur = self._conn.executemany(
                    f"UPDATE {table} SET sent_at = '{now}' WHERE key = ? AND sent_at IS NULL",  # noqa: S608
                    wanted,
                )
                changed += max(cur.rowcount, 0)
        return changed

    def park(self, key: uuid.UUID | str, reason: str) -> None:
        """Keep a poison record or event but never send it again."""
        reason = reason or "parked"
        with self._writing("a parked mark"), self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            for table in ("records", "events"):
                self._conn.execute(
                    f"UPDATE {table} SET parked_reason = ? WHERE key = ?",  # noqa: S608
                    (reason[:500], str(key)),
                )
        _LOGGER.warning("parked %s: %s", key, reason)

    def parked(self) -> list[tuple[str, str]]:
        """(key, reason) of every parked record and event."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, parked_reason FROM records WHERE parked_reason IS NOT NULL "
                "UNION ALL SELECT key, parked_reason FROM events WHERE parked_reason IS NOT NULL"
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def prune(self, sent_before: datetime, parked_before: datetime | None = None) -> int:
        """Delete records and events acknowledged before ``sent_before``, parked ones (never
        sent: the aggregator refused them) made before ``parked_before`` (None: none), and
        cached schedules of days before ``sent_before``; unsent rows are never deleted.
        Returns rows deleted."""
        cutoff = _iso(sent_before)
        parked_cutoff = _iso(parked_before) if parked_before is not None else ""
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            deleted = 0
            for table in ("records", "events"):
                deleted += self._conn.execute(
                    f"DELETE FROM {table} WHERE sent_at < ? OR "  # noqa: S608
                    "(parked_reason IS NOT NULL AND created_at < ?)", (cutoff, parked_cutoff)
                ).rowcount
            deleted += self._conn.execute(
                "DELETE FROM schedules WHERE day < ?", (sent_before.date().isoformat(),)
            ).rowcount
        if deleted:
            _LOGGER.info("store: deleted %d rows sent before %s", deleted, cutoff)
        return deleted

    def outbox_depth(self) -> int:
        """Records and events not yet acknowledged, parked ones excluded."""
        with self._lock:
            row = self._conn.execute(
                "SELECT (SELECT count(*) FROM records WHERE sent_at IS NULL AND parked_reason "
                "IS NULL) + (SELECT count(*) FROM events WHERE sent_at IS NULL AND "
                "parked_reason IS NULL)"
            ).fetchone()
        return int(row[0])

    def oldest_unsent_age_s(self, now: datetime | None = None) -> float | None:
        """Age in seconds of the oldest unacknowledged record or event, None when none."""
        with self._lock:
            row = self._conn.execute(
                "SELECT min(c) FROM (SELECT min(created_at) AS c FROM records WHERE sent_at IS "
                "NULL AND parked_reason IS NULL UNION ALL SELECT min(created_at) FROM events "
                "WHERE sent_at IS NULL AND parked_reason IS NULL)"
            ).fetchone()
        if row is None or row[0] is None:
            return None
        oldest = datetime.fromisoformat(row[0])
        return max(0.0, ((now or _utcnow()) - oldest).total_seconds())

    def records_since(self, since: datetime) -> list[AttendanceRecord]:
        """Every record (sent or not) seen at or after ``since``, by seen_at."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT payload FROM records WHERE seen_at >= ? ORDER BY seen_at, rowid",
                (_iso(since),),
            ).fetchall()
        return [AttendanceRecord.model_validate_json(r[0]) for r in rows]

    def last_seen_by_student(self, since: datetime) -> dict[str, datetime]:
        """Latest seen_at per student since ``since`` (restores the debounce after a restart)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT student_id, max(seen_at) FROM records WHERE seen_at >= ? "
                "GROUP BY student_id",
                (_iso(since),),
            ).fetchall()
        return {r[0]: datetime.fromisoformat(r[1]) for r in rows}

    # -- schedule / roster cache ----------------------------------------------------------------
    def save_schedule(self, schedule: ScheduleResponse, etag: str | None) -> None:
        """Cache the room's schedule (with rosters) of one day: :meth:`save_schedules`."""
        self.save_schedules([schedule], etag)

    def save_schedules(self, schedules: list[ScheduleResponse], etag: str | None) -> None:
        """Cache the room's schedules (with rosters) of today and the next school days, in
        one transaction that replaces every cached day (past ones, and coming ones no longer
        sent). The replaced descriptors are overwritten (secure_delete) and the WAL
        truncated, so a student dropped from the rosters (consent withdrawn) is gone from
        every day and from the files too."""
        saved_at = _iso(_utcnow())
        rows = [{"day": s.date.isoformat(), "payload": s.model_dump_json(), "etag": etag,
                 "saved_at": saved_at} for s in schedules]
        with self._writing("the schedule"), self._lock:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("DELETE FROM schedules")
                self._conn.executemany(
                    "INSERT OR REPLACE INTO schedules (day, payload, etag, saved_at) "
                    "VALUES (:day, :payload, :etag, :saved_at)", rows)
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def cached_days(self) -> list[date]:
        """The days whose schedule is cached, in order."""
        with self._lock:
            rows = self._conn.execute("SELECT day FROM schedules ORDER BY day").fetchall()
        return [date.fromisoformat(r[0]) for r in rows]

    def wipe_rosters(self) -> int:
        """Delete every cached schedule and roster (the device was deregistered); returns
        how many days were deleted."""
        with self._lock:
            deleted = self._conn.execute("DELETE FROM schedules").rowcount
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if deleted:
            _LOGGER.warning("store: cached rosters wiped (%d day(s))", deleted)
        return deleted

    def load_schedule(self, day: date | None = None) -> tuple[ScheduleResponse, str | None] | None:
        """The cached schedule of ``day`` (default: the first day of the last pull), with its
        etag."""
        with self._lock:
            if day is None:
                row = self._conn.execute(
                    "SELECT payload, etag FROM schedules ORDER BY saved_at DESC, day LIMIT 1"
                ).fetchone()
            else:
                row = self._conn.execute(
                    "SELECT payload, etag FROM schedules WHERE day = ?", (day.isoformat(),)
                ).fetchone()
        if row is None:
            return None
        return ScheduleResponse.model_validate_json(row[0]), row[1]

    # -- state ----------------------------------------------------------------------------------
    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_state(self, key: str, value: str) -> None:
        with self._writing("state"), self._lock:
            self._db["state"].upsert({"key": key, "value": value}, pk="key")

    def get_state_json(self, key: str) -> Any:
        raw = self.get_state(key)
        return None if raw is None else json.loads(raw)

    def set_state_json(self, key: str, value: Any) -> None:
        self.set_state(key, json.dumps(value))
