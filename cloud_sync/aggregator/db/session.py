"""Engines and sessions: SQLite (WAL, foreign keys on) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

_LOGGER = logging.getLogger(__name__)


def _sqlite_pragmas(synchronous: str) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # Deleted rows (face descriptors above all) are overwritten, not left in free space.
            cur.execute("PRAGMA secure_delete=ON")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA busy_timeout=10000")
        finally:
            cur.close()
        # SQLAlchemy emits BEGIN itself (see _sqlite_begin), so writers can take the write
        # lock up front (BEGIN IMMEDIATE) instead of failing to upgrade a read lock.
        dbapi_conn.isolation_level = None

    return on_connect


WRITE = {"sqlite_write": True}


def _sqlite_hooks(engine: Engine) -> None:
    """BEGIN (IMMEDIATE for writers) emitted by SQLAlchemy; writers of this process queue on a
    lock first, so they wait for each other without SQLite's sleeping busy handler (which
    backs off up to 100 ms); other processes still meet busy_timeout."""
    lock = threading.Lock()

    def begin(conn: Any) -> None:
        write = conn.get_execution_options().get("sqlite_write", False)
        if write:
            lock.acquire()
            conn.info["write_lock"] = True
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
        except Exception:
            release(conn)
            raise

    def release(conn: Any) -> None:
        if conn.info.pop("write_lock", False):
            lock.release()

    def checkin(_dbapi_conn: Any, record: Any) -> None:
        # After a commit the session returns the connection: the commit (and its fsync) is
        # done, so the next writer will not meet a busy database.
        if record is not None and record.info.pop("write_lock", False):
            lock.release()

    event.listen(engine, "begin", begin)
    event.listen(engine, "rollback", release)
    event.listen(engine, "checkin", checkin)


def begin_write(session: Session) -> None:
    """Call first in a session that will write: on SQLite the transaction takes the write lock
    at once (BEGIN IMMEDIATE), so concurrent writers queue on busy_timeout instead of failing
    with 'database is locked'. A no-op on PostgreSQL and inside a running transaction."""
    if not session.in_transaction():
        session.connection(execution_options=WRITE)


# The pool is sized to what checks connections out, so that it never opens and closes
# connections under load (with a pool smaller than its users, every connection beyond it was
# closed on return: ~180 new PostgreSQL connections per 8 s at 50 devices): the threads of
# the request thread pool (the app sets anyio's limit to THREADS), the group committer's
# writers (4 on PostgreSQL) and a margin for a thread that holds two (a batch's session and
# its partition check). The app rarely has them all out at once, and a connection is opened
# only when first needed.
THREADS = 40  # anyio's default thread limit, set explicitly by create_app
POOL_SIZE = THREADS + 8
POOL_OVERFLOW = 8


def make_engine(url: str, *, sqlite_synchronous: str = "FULL",
                pool_size: int = POOL_SIZE) -> Engine:
    """An engine for ``url``. SQLite: the parent directory is created, WAL and foreign keys are
    switched on for every connection. PostgreSQL: a pooled psycopg 3 engine. The pool keeps
    up to ``pool_size`` connections open (POOL_SIZE: see above) and opens at most
    POOL_OVERFLOW more for a moment."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if sqlite_synchronous not in {"NORMAL", "FULL"}:
            raise ValueError("sqlite_synchronous must be NORMAL or FULL")
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size, max_overflow=POOL_OVERFLOW,
        )
        event.listen(engine, "connect", _sqlite_pragmas(sqlite_synchronous))
        _sqlite_hooks(engine)
        return engine
    # No pre-ping (a round trip per checkout): after a server restart the first use of a stale
    # connection fails (503, the device retries) and the pool is refreshed at once.
    return create_engine(url, pool_size=pool_size, max_overflow=POOL_OVERFLOW,
                         pool_recycle=1800)


def make_session_factory(
    engine: Engine, info: dict[str, Any] | None = None
) -> sessionmaker[Session]:
    """Sessions for ``engine``; ``info`` (e.g. ingest settings) is copied into each one."""
    return sessionmaker(engine, expire_on_commit=False, info=info or {})


def is_postgres(session_or_engine: Session | Engine) -> bool:
    bind = session_or_engine.get_bind() if isinstance(session_or_engine, Session) else (
        session_or_engine
    )
    return bind.dialect.name == "postgresql"
