"""The key of the device's encrypted store: asked of the aggregator at start, kept in memory.

``store.encryption = "aggregator"`` (the default) with ``sync.aggregator_url`` set: the store
opens *locked* (appliance/store.py) and :func:`unlock_store` asks ``POST /api/v1/store-key``
(the device's API key authenticates it; the aggregator audits every release) until the key
arrives, with the sync agent's back-off. Nothing writes the key to disk. Why this key source
and not clevis/tang, and what a device that restarts without its aggregator does: docs/PRIVACY.md
("The device at rest").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance.logging_setup import LogThrottle
from appliance.store import Store
from appliance.sync.backoff import Backoff
from appliance.sync.errors import CredentialsRefusedError, TransportError
from appliance.sync.http_transport import HttpTransport

if TYPE_CHECKING:
    from appliance.clock import DeviceClock
    from appliance.config import ApplianceSettings

_LOGGER = logging.getLogger(__name__)

REFUSED_RETRY_S = 60.0  # a refused device does not fix itself in a second
LOG_EVERY_S = 300.0
WAITING = "waiting for the store key from the aggregator"


def wants_key(settings: ApplianceSettings) -> bool:
    """Whether this device's store is encrypted with the aggregator's key."""
    return settings.store.encryption == "aggregator" and bool(settings.sync.aggregator_url)


def open_store(settings: ApplianceSettings) -> Store:
    """The device's store: locked until :func:`unlock_store` when it is encrypted, else open
    (unencrypted: said once in the log, and in /health's ``database`` details)."""
    if wants_key(settings):
        return Store(settings.paths.data_dir, locked=WAITING)
    if settings.store.encryption == "aggregator":
        _LOGGER.warning("store not encrypted: no sync.aggregator_url to hand out its key "
                        "(a copy of the SD card would show the outbox and rosters)")
    return Store(settings.paths.data_dir)


def unlock_store(settings: ApplianceSettings, store: Store, stop: threading.Event,
                 tick: Callable[[], None] | None = None,
                 clock: DeviceClock | None = None) -> bool:
    """Ask the aggregator for the store key until it answers, then unlock the store: True; or
    until ``stop`` is set: False. ``tick`` runs at least once a second while waiting (the
    systemd watchdog). ``store.lock_reason`` says what the wait is about (shown by /health:
    no URL, no error text, nothing secret)."""
    if not store.locked:
        return True
    sync = settings.sync
    assert sync.aggregator_url is not None
    backoff = Backoff(sync.backoff_initial_s, sync.backoff_max_s)
    throttle = LogThrottle(LOG_EVERY_S)
    transport = HttpTransport(sync.aggregator_url, sync.api_key, sync.request_timeout_s,
                              clock=clock)
    attempts = 0
    try:
        while not stop.is_set():
            attempts += 1
            try:
                key = transport.fetch_store_key(settings.device.device_id)
            except CredentialsRefusedError as err:
                store.lock_reason = (
                    "the aggregator refuses this device (deregistered, or a wrong "
                    f"sync.api_key): its store cannot be opened ({attempts} attempts)")
                throttle.log(_LOGGER, logging.ERROR, "refused", "store key refused: %s; the "
                             "store stays locked (register the device again, or fix "
                             "sync.api_key)", err)
                delay = backoff.next_delay(min(REFUSED_RETRY_S, sync.backoff_max_s))
            except TransportError as err:
                store.lock_reason = f"{WAITING}: it does not answer ({attempts} attempts)"
                throttle.log(_LOGGER, logging.WARNING, "unreachable", "store key: the "
                             "aggregator does not answer (%s); nothing is recorded until it "
                             "does", err)
                delay = backoff.next_delay()
            else:
                store.unlock(key)
                _LOGGER.info("store unlocked after %d attempt(s)%s", attempts,
                             f"; an unreadable store was moved aside as {store.set_aside.name}"
                             if store.set_aside else "")
                return True
            _wait(stop, delay, tick)
        return False
    finally:
        transport.close()


def _wait(stop: threading.Event, seconds: float, tick: Callable[[], None] | None) -> None:
    end = time.monotonic() + seconds
    while not stop.is_set():
        if tick is not None:
            tick()
        left = end - time.monotonic()
        if left <= 0:
            return
        stop.wait(min(1.0, left))
