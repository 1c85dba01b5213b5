"""`appliance run`: start every component of the device and keep them running.

Wiring (each component has a non-blocking ``start()`` and a ``stop()``):

    Store ─┬─ roster provider: with an aggregator, the class scheduled now
           │    (appliance.sync.ScheduleRosterProvider, falling back to recognition.roster_file);
           │    without one, recognition.roster_file
           ├─ SyncAgent (appliance.sync; only when sync.aggregator_url or sync.mqtt_url is set):
           │    saves the schedule the provider reads, heartbeats with the pipeline's status
           ├─ Pipeline (capture thread + processing thread) ── records ──► Store outbox
           ├─ WebServer (appliance.web.server; when web.enabled)
           └─ AlertMonitor (appliance.alerts)

With an encrypted store (``store.encryption = "aggregator"``, the default with an aggregator)
the store opens locked: the status page starts first (its /health says the store is locked
and why), the main thread asks the aggregator for the key (pinging the watchdog meanwhile),
and the other components start once the store is unlocked. When the aggregator cannot be
reached, the key kept on the card may unlock it (appliance/sync/store_key.py: the board's OTP
key, or the flash-time policy ``store.offline_unlock_days``); the "store key" component then
has the aggregator confirm the key, refreshes or deletes the wrapped copy.

The main thread then loops: it pings the systemd watchdog (WATCHDOG=1) only while the pipeline
is alive, deletes records sent more than ``store.keep_sent_days`` ago once an hour, and stops
everything in reverse order on SIGTERM/SIGINT (STOPPING=1).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import appliance
from appliance.alerts import AlertMonitor
from appliance.clock import DeviceClock
from appliance.config import ApplianceSettings
from appliance.pipeline import Pipeline
from appliance.recognition import FileRosterProvider, RosterProvider
from appliance.store import STORE_ERRORS, Store
from appliance.sync import ScheduleRosterProvider, SyncAgent
from appliance.sync.store_key import KeyKeeper, open_store
from appliance.watchdog import Notifier, watchdog_interval_s
from cloud_sync.protocol import Event
from models import load_manifest, model_path

_LOGGER = logging.getLogger(__name__)

LOOP_S = 1.0
LOCK_FILE = "appliance.lock"
PRUNE_EVERY_S = 3600.0


@dataclass
class Appliance:
    """Every running component, in start order."""

    settings: ApplianceSettings
    store: Store
    pipeline: Pipeline
    clock: DeviceClock
    components: list[tuple[str, Any]] = field(default_factory=list)
    sync: SyncAgent | None = None
    keeper: KeyKeeper | None = None
    started: list[tuple[str, Any]] = field(default_factory=list)

    def start(self, stop: threading.Event | None = None,
              only: tuple[str, ...] | None = None) -> None:
        """Start the components not started yet, in order (``only``: just those named); once
        ``stop`` is set (a signal during a slow start) the rest are not started."""
        for name, comp in self.components:
            if (name, comp) in self.started or (only is not None and name not in only):
                continue
            if stop is not None and stop.is_set():
                _LOGGER.info("stop requested: %s and later components not started", name)
                return
            _LOGGER.info("starting %s", name)
            comp.start()
            self.started.append((name, comp))

    def stop(self) -> None:
        for name, comp in reversed(self.started):
            try:
                comp.stop()
            except Exception:  # one failing stop must not keep the rest running
                _LOGGER.exception("stopping %s failed", name)
        self.clock.save()
        self.store.close()


def build(settings: ApplianceSettings) -> Appliance:
    """Create (not start) the components the settings ask for."""
    for spec in load_manifest():
        model_path(spec.name, settings.paths.model_dir)  # verified, or ModelError
    _LOGGER.info("models verified in %s", settings.paths.model_dir)
    syncing = bool(settings.sync.aggregator_url or settings.sync.mqtt_url)
    # encrypted with the aggregator's key: locked until it hands the key out (_unlock)
    store = open_store(settings) if syncing else Store(settings.paths.data_dir)
    # trusted time (NTP, the aggregator's, this boot's persisted anchor, an RTC) or flagged
    clock = DeviceClock(settings.clock, settings.paths.data_dir)
    # the store key: from the aggregator, or offline from the key kept on the card
    keeper = KeyKeeper(settings, store, clock) if store.locked else None
    provider: RosterProvider = FileRosterProvider(settings.recognition.roster_file)
    schedule = None
    if syncing:
        schedule = ScheduleRosterProvider.for_device(settings, store, fallback=provider,
                                                     clock=clock)
        provider = schedule
    reporter = None
    if settings.unknown_faces.enabled and settings.sync.aggregator_url:
        from appliance.unknown_faces import UnknownFaceReporter

        reporter = UnknownFaceReporter(settings)
    pipeline = Pipeline(settings, store, provider,
                        unknown_sink=reporter.offer if reporter is not None else None,
                        clock=clock)
    sync = None
    if syncing:
        sync = SyncAgent(settings, store, pipeline_status=pipeline.status,
                         roster_provider=schedule, clock=clock,
                         on_contact=keeper.on_contact if keeper is not None else None)
    app = Appliance(settings, store, pipeline, clock, sync=sync, keeper=keeper)
    if keeper is not None:
        app.components.append(("store key", keeper))
    if sync is not None:
        app.components.append(("sync agent", sync))
    if reporter is not None:
        app.components.append(("unknown faces", reporter))
    app.components.append(("pipeline", pipeline))
    if settings.web.enabled:
        from appliance.web.server import WebServer  # FastAPI and uvicorn: only when serving

        app.components.append(("status page", WebServer(
            settings, pipeline, store, sync_status=sync.status if sync is not None else None,
            clock=clock)))
    app.components.append(("alert monitor", AlertMonitor(settings, pipeline, store)))
    return app


class DataDirLockedError(RuntimeError):
    """Another appliance runs on this data directory (the message says which and what to do)."""


def lock_data_dir(data_dir: Path) -> int:
    """Take ``<data_dir>/appliance.lock`` (an exclusive ``flock``, released when the process
    ends, however it ends) and write our pid in it; returns the open descriptor.

    Two appliances on one data directory would share one outbox and one camera, and the second
    status page could not bind its port: :class:`DataDirLockedError` instead, before anything
    starts.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLockedError(
            f"another appliance is already running on {data_dir} (pid {holder}): stop it "
            "first (Ctrl-C where it runs, or `sudo systemctl stop classroom-appliance`), or "
            "give this one its own paths.data_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def run_appliance(settings: ApplianceSettings, stop_event: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop_event``); returns the exit code.

    Raises :class:`DataDirLockedError` at once when another appliance runs on the data directory."""
    lock_fd = lock_data_dir(settings.paths.data_dir)
    try:
        return _run_locked(settings, stop_event)
    finally:
        os.close(lock_fd)


def _run_locked(settings: ApplianceSettings, stop_event: threading.Event | None) -> int:
    stop = stop_event or threading.Event()
    app = build(settings)
    notifier = Notifier()

    interrupts = 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal interrupts
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:  # Ctrl-C again: the user will not wait for a clean stop
                _LOGGER.warning("second Ctrl-C: exiting now (every record is already "
                                "committed to the outbox)")
                os._exit(130)
        _LOGGER.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        if app.store.locked and not _unlock(app, notifier, stop):
            return 0  # stopped while waiting for the key
        app.start(stop)
        app.store.add_event(Event(
            device_id=settings.device.device_id, room_id=settings.device.room_id,
            kind="device_started", severity="info",
            message=f"appliance {appliance.__version__} started",
            at=app.clock.now(),
        ))
        if not stop.is_set():
            notifier.ready(f"camera {app.pipeline.capture.description}")
            _LOGGER.info("appliance running (device %s, room %s)", settings.device.device_id,
                         settings.device.room_id)
            _main_loop(app, notifier, stop)
    finally:
        notifier.stopping()
        app.stop()
        notifier.close()
    return 0 if app.pipeline.error is None else 1


def _unlock(app: Appliance, notifier: Notifier, stop: threading.Event) -> bool:
    """Status page first, then wait for the store key (READY=1 at once, so systemd does not
    time the start out; watchdog pings while waiting): True once unlocked."""
    app.start(only=("status page",))
    notifier.ready("store locked: waiting for the store key from the aggregator")
    interval = watchdog_interval_s()
    last_ping = 0.0

    def tick() -> None:
        nonlocal last_ping
        app.clock.tick()
        if time.monotonic() - last_ping >= interval:
            notifier.ping()
            last_ping = time.monotonic()

    _LOGGER.info("store encrypted: asking the aggregator for its key")
    keeper = app.keeper or KeyKeeper(app.settings, app.store, app.clock)
    return keeper.unlock(stop, tick)


def _prune(app: Appliance) -> None:
    store = app.settings.store
    now = datetime.now(UTC)
    try:
        app.store.prune(now - timedelta(days=store.keep_sent_days),
                        now - timedelta(days=store.keep_parked_days))
    except STORE_ERRORS as err:  # housekeeping must never stop the device
        _LOGGER.warning("store: pruning sent records failed: %s", err)


def _main_loop(app: Appliance, notifier: Notifier, stop: threading.Event) -> None:
    interval = watchdog_interval_s()
    last_ping = 0.0
    last_prune = -PRUNE_EVERY_S
    warned = False
    while not stop.wait(LOOP_S):
        app.clock.tick()  # the trusted time on disk every 10 min (a restart starts from it)
        if time.monotonic() - last_prune >= PRUNE_EVERY_S:
            _prune(app)
            last_prune = time.monotonic()
        if app.pipeline.alive():
            warned = False
            now = time.monotonic()
            if now - last_ping >= interval:
                notifier.ping()
                last_ping = now
        elif not warned:
            # no ping: systemd's watchdog restarts the service (WatchdogSec)
            _LOGGER.error("pipeline not alive (%s): watchdog pings stopped",
                          app.pipeline.error or "stalled")
            warned = True
        if app.pipeline.error is not None and not notifier.enabled:
            _LOGGER.error("pipeline failed and no systemd watchdog: exiting")
            break
