"""Messages between aggregator processes: PostgreSQL LISTEN/NOTIFY, or Redis pub/sub when
``redis_url`` is set. Used for two things:

- ``invalidate``: an admin write changed devices, rooms, courses, schedules or tokens; every
  process clears its caches (credentials, device contexts, rooms) on receipt;
- ``live``: a record batch or event for ``/ws/events`` clients, which may be connected to
  another process than the one that stored it (``services/live.py``).

Each process listens on one connection of its own, in a thread that reconnects with backoff.
Until it is (re)connected a process may have missed messages: ``connected`` is False and the
app does not trust its caches (every lookup goes to the database) until it is back, when it
clears them. Messages are JSON objects; a PostgreSQL payload is at most 8000 bytes (the
publisher splits live batches to fit).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import make_url

_LOGGER = logging.getLogger(__name__)
CHANNEL = "aggregator_bus"
PG_MAX_PAYLOAD = 7900
RETRY_MAX_S = 10.0

Handler = Callable[[dict[str, Any]], None]


class Bus:
    """Base: the listener thread and its reconnect loop; subclasses connect and publish."""

    kind = "none"

    def __init__(self, on_message: Handler, on_connect: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_connect = on_connect
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.max_payload: int | None = None

    def start(self, wait_s: float = 5.0) -> None:
        self._thread = threading.Thread(target=self._run, name=f"bus-{self.kind}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + wait_s
        while not self.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.connected:
            _LOGGER.warning("%s bus not connected yet: caches off until it is", self.kind)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._close()

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                self._listen()
                delay = 0.2
            except Exception as err:  # any failure: reconnect (never kill the thread)
                if self.connected:
                    _LOGGER.warning("%s bus lost: %s (caches off until reconnected)",
                                    self.kind, err)
                self.connected = False
                self._stop.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    def _connected(self) -> None:
        """Called by ``_listen`` once subscribed: whatever was missed is forgotten."""
        self._on_connect()
        self.connected = True
        _LOGGER.info("%s bus listening", self.kind)

    def _deliver(self, payload: str | bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            _LOGGER.warning("%s bus: a message that is not JSON ignored", self.kind)
            return
        if isinstance(message, dict):
            try:
                self._on_message(message)
            except Exception:
                _LOGGER.exception("%s bus: handling a message failed", self.kind)

    def publish(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _listen(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        return None


class PostgresBus(Bus):
    kind = "postgresql"

    def __init__(self, database_url: str, on_message: Handler,
                 on_connect: Callable[[], None]) -> None:
        super().__init__(on_message, on_connect)
        url = make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._pub: Any = None
        self._pub_lock = threading.Lock()
        self.max_payload = PG_MAX_PAYLOAD

    def _listen(self) -> None:
        import psycopg

        with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self._connected()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=1.0):
                    self._deliver(note.payload)
                # a dead server ends notifies() quietly on some versions: check the link
                conn.execute("SELECT 1")

    def publish(self, message: dict[str, Any]) -> None:
        import psycopg

        payload = json.dumps(message, default=str, separators=(",", ":"))
        with self._pub_lock:
            for attempt in (1, 2):
                try:
                    if self._pub is None or self._pub.closed:
                        self._pub = psycopg.connect(self._conninfo, autocommit=True,
                                                    connect_timeout=5)
                    self._pub.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                    return
                except psycopg.OperationalError:
                    self._pub = None
                    if attempt == 2:
                        raise

    def _close(self) -> None:
        with self._pub_lock:
            if self._pub is not None:
                self._pub.close()
                self._pub = None


class RedisBus(Bus):
    kind = "redis"

    def __init__(self, redis_url: str, prefix: str, on_message: Handler,
                 on_connect: Callable[[], None]) -> None:
        import redis

        super().__init__(on_message, on_connect)
        self._channel = f"{prefix}:{CHANNEL}"
        self._redis = redis.Redis.from_url(redis_url, socket_connect_timeout=5,
                                           socket_timeout=5, health_check_interval=10)

    def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            pubsub.subscribe(self._channel)
            while not self._stop.is_set():
                item = pubsub.get_message(timeout=1.0)
                if item is None:
                    continue
                if item.get("type") == "subscribe":  # confirmed: from now on we hear all
                    self._connected()
                elif item.get("type") == "message":
                    self._deliver(item["data"])
        finally:
            pubsub.close()

    def publish(self, message: dict[str, Any]) -> None:
        self._redis.publish(self._channel, json.dumps(message, default=str,
                                                      separators=(",", ":")))

    def _close(self) -> None:
        self._redis.close()


def split_records(message: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
    """A live message whose ``records`` list makes it longer than ``limit`` bytes, as several
    messages with parts of the list (each under the limit)."""
    text = json.dumps(message, default=str, separators=(",", ":"))
    records = message.get("records")
    if limit is None or len(text.encode()) <= limit or not isinstance(records, list) \
            or len(records) < 2:
        return [message]
    half = len(records) // 2
    return (split_records({**message, "records": records[:half]}, limit)
            + split_records({**message, "records": records[half:]}, limit))
