"""The live feed behind ``/ws/events``: new attendance records and device events, fanned out
to the connected clients.

Producers are the ingest functions (HTTP handlers in the thread pool and the MQTT bridge's
thread): they call :meth:`LiveFeed.publish` after their commit; it costs nothing while nobody
listens. Each client has a bounded queue on its own event loop; a client that falls
``ws_queue_messages`` behind is marked dropped and its connection closed, so memory stays
bounded whatever a client does. The feed reaches the ingest functions through the session
factory's ``info`` (:data:`LIVE_FEED_INFO_KEY`), like the other per-app settings.

Several processes (PostgreSQL): a client is connected to one process, a record may be stored by
another. The app then sets :attr:`LiveFeed.relay`: a message goes through the bus
(``cloud_sync.aggregator.bus``) to every process, each delivering it to its own clients. A
process with clients says so on the bus every ``LISTENING_EVERY_S``; the others relay only
while they have heard that within ``LISTENING_TTL_S``, so nobody pays while nobody listens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from cloud_sync.aggregator import metrics

_LOGGER = logging.getLogger(__name__)

LIVE_FEED_INFO_KEY = "live_feed"
RECORD_TYPE = "attendance"  # the type of a record message; events use their kind
LISTENING_EVERY_S = 5.0
LISTENING_TTL_S = 15.0
Relay = Callable[[str, str, dict[str, Any]], None]


class TooManyClientsError(RuntimeError):
    pass


@dataclass(eq=False)
class Subscriber:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[str]
    rooms: frozenset[str] | None
    types: frozenset[str] | None
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, room_id: str, kind: str) -> bool:
        return ((self.rooms is None or room_id in self.rooms)
                and (self.types is None or kind in self.types))


class LiveFeed:
    def __init__(self, queue_messages: int = 256, max_clients: int = 100) -> None:
        self.queue_messages = queue_messages
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._subs: list[Subscriber] = []
        self.dropped_total = 0
        self.relay: Relay | None = None  # set when other processes share the feed
        self.announce: Callable[[], None] | None = None  # "I have clients", to the others
        self._heard_until = 0.0

    def heard_listener(self) -> None:
        """Another process has clients (a ``listening`` message on the bus)."""
        self._heard_until = time.monotonic() + LISTENING_TTL_S

    def wanted(self) -> bool:
        """Whether a message would reach anybody (here, or in a process heard of lately)."""
        return bool(self._subs) or (self.relay is not None
                                    and time.monotonic() < self._heard_until)

    @property
    def clients(self) -> int:
        return len(self._subs)

    def subscribe(self, rooms: Iterable[str] | None = None,
                  types: Iterable[str] | None = None) -> Subscriber:
        """Call on the client's event loop."""
        sub = Subscriber(asyncio.get_running_loop(), asyncio.Queue(self.queue_messages),
                         frozenset(rooms) if rooms else None, frozenset(types) if types else None)
        with self._lock:
            if len(self._subs) >= self.max_clients:
                raise TooManyClientsError(f"{self.max_clients} live clients already")
            self._subs = [*self._subs, sub]
            first = len(self._subs) == 1
        metrics.WS_CLIENTS.set(len(self._subs))
        if first and self.announce is not None:
            self.announce()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s is not sub]
        metrics.WS_CLIENTS.set(len(self._subs))

    def publish(self, room_id: str, kind: str, message: dict[str, Any]) -> int:
        """To every client of every process (through the relay when there is one), else
        :meth:`deliver`; any thread."""
        if self.relay is not None:
            try:
                self.relay(room_id, kind, message)
                return 0
            except Exception as err:  # the bus is down: at least this process's clients
                _LOGGER.warning("live message not relayed: %s", err)
        return self.deliver(room_id, kind, message)

    def deliver(self, room_id: str, kind: str, message: dict[str, Any]) -> int:
        """Offer one message (``type`` = kind) to every client of this process that wants
        it; any thread. Returns the number of clients it was offered to."""
        subs = [s for s in self._subs if s.wants(room_id, kind)]  # a snapshot: no lock needed
        if not subs:
            return 0
        text = json.dumps({"type": kind, "room_id": room_id, **message}, default=str)
        for sub in subs:
            try:
                sub.loop.call_soon_threadsafe(self._offer, sub, text)
            except RuntimeError:  # that client's loop is closed: it is going away
                self.unsubscribe(sub)
        return len(subs)

    def _offer(self, sub: Subscriber, text: str) -> None:
        """On the client's loop: queue, or drop a client that fell behind."""
        if sub.dropped.is_set():
            return
        try:
            sub.queue.put_nowait(text)
        except asyncio.QueueFull:
            sub.dropped.set()
            self.dropped_total += 1
            metrics.WS_DROPPED.inc()
            _LOGGER.warning("live client dropped: %d messages behind", sub.queue.qsize())
            while not sub.queue.empty():  # free its backlog now
                sub.queue.get_nowait()


def feed_of(session: Session) -> LiveFeed | None:
    feed = session.info.get(LIVE_FEED_INFO_KEY)
    return feed if isinstance(feed, LiveFeed) else None


def publish_records(session: Session, rows: list[dict[str, Any]]) -> None:
    """New attendance rows of one batch (one device, so one room) to the live feed: one
    message per batch, so a client's queue counts batches, not records."""
    publish_records_on(feed_of(session), rows)


def publish_records_on(feed: LiveFeed | None, rows: list[dict[str, Any]]) -> None:
    """:func:`publish_records` when the caller holds the feed itself, not a session."""
    if feed is None or not feed.wanted() or not rows:
        return
    feed.publish(rows[0]["room_id"], RECORD_TYPE, {"records": [{
        "key": str(row["key"]), "student_id": row["student_id"], "course_id": row["course_id"],
        "device_id": row["device_id"], "at": row["at"].isoformat(),
        "confidence": row["confidence"],
    } for row in rows]})


def publish_event(session: Session, event: Any) -> None:
    """A newly stored device event to the live feed (the wire form of the event)."""
    publish_event_on(feed_of(session), event)


def publish_event_on(feed: LiveFeed | None, event: Any) -> None:
    """:func:`publish_event` when the caller holds the feed itself, not a session."""
    if feed is None or not feed.wanted():
        return
    feed.publish(event.room_id, event.kind, {"event": event.model_dump(mode="json")})
