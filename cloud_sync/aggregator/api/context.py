"""Per-app state shared by the routers: settings, sessions, credential cache, rate limiter,
the app's caches (state.py) and the bus to the other processes (bus.py)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cloud_sync.aggregator.api.limiter import Limiter
from cloud_sync.aggregator.bus import Bus
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.watch import WriteWatch
from cloud_sync.aggregator.services.faces import FaceEncoder
from cloud_sync.aggregator.services.live import LiveFeed
from cloud_sync.aggregator.services.privacy import Scrubber
from cloud_sync.aggregator.services.reports import Rules
from cloud_sync.aggregator.state import AppState, TTLCache

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DevicePrincipal:
    device_id: str
    room_id: str
    site: str


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    token_id: int
    name: str


Principal = DevicePrincipal | AdminPrincipal


class CredentialCache(TTLCache[Principal]):
    """digest -> principal for ``ttl_s`` seconds (0 disables); cleared on key changes, in
    every process (``AppContext.invalidate``)."""


@dataclass
class AppContext:
    settings: AggregatorSettings
    engine: Engine
    sessions: sessionmaker[Session]
    credentials: CredentialCache
    limiter: Limiter
    encoder: FaceEncoder
    rules: Rules
    state: AppState
    instance: str = ""  # <instance_name>:<pid> in /health (admin token only)
    # what /health says without an admin token: random, per process
    public_instance: str = field(default_factory=lambda: secrets.token_hex(6))
    bus: Bus | None = None
    ready: bool = False  # migrated and started (the lifespan); False again while stopping
    mqtt_bridge: Any = None
    mqtt_state: str = "disabled"
    write_watch: WriteWatch | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    live: LiveFeed = field(default_factory=LiveFeed)  # /ws/events
    # counts credential changes heard by this process (forget): open /ws/events sockets check
    # their token again when it moves
    credential_epoch: int = 0
    # scrubs the database files after face data was deleted, off the request (privacy.py)
    scrubber: Scrubber = field(init=False)

    def __post_init__(self) -> None:
        self.scrubber = Scrubber(self.engine)

    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def trusted(self) -> bool:
        """Whether this process may use its caches: it hears the other processes' writes."""
        return self.bus is None or self.bus.connected

    def forget(self) -> None:
        """Clear this process's caches (credentials, device contexts, rooms)."""
        self.credentials.clear()
        self.state.invalidate()
        self.credential_epoch += 1

    def invalidate(self) -> None:
        """After an admin write that changes devices, keys, rooms, courses or schedules: clear
        the caches here and now, and in every other process (through the bus)."""
        self.forget()
        if self.bus is None:
            return
        try:
            self.bus.publish({"t": "invalidate"})
        except Exception as err:  # the others keep their caches for at most their TTL
            _LOGGER.error("cache invalidation not sent to the other processes: %s", err)
