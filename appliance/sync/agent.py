"""The sync agent: drains the outbox, pulls the schedule, sends heartbeats.

One worker thread does everything in turn, so the store sees one writer from sync and the
order of operations is easy to reason about:

- roster/schedule pull over HTTP (ETag) at start, every ``sync.roster_refresh_s`` and at once
  when the aggregator announces a change on the room's retained roster topic (MQTT);
- outbox drain: the oldest unsent records in batches of ``sync.batch_size``, then events; a
  record is marked sent only when the aggregator acknowledged it (HTTP 2xx with the counts,
  or the application-level ack over MQTT), so a crash at any point re-sends, never loses, and
  the aggregator's idempotency on record keys turns a re-send into a "duplicate";
- a record the aggregator rejects with a reason (or a record a whole batch was refused for,
  found by splitting the batch) is parked with that reason and no longer blocks the queue;
- failures back off exponentially with full jitter; a successful heartbeat or pull ends the
  back-off, so a returning aggregator is drained at once;
- a heartbeat every ``sync.heartbeat_s``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psutil

from appliance import __version__ as software_version
from appliance import metrics
from appliance.clock import DeviceClock
from appliance.config import ApplianceSettings
from appliance.logging_setup import LogThrottle
from appliance.placement import placement_report
from appliance.status import PipelineStatus
from appliance.store import Store
from appliance.sync.backoff import Backoff
from appliance.sync.errors import (
    BatchRefusedError,
    CredentialsRefusedError,
    NotSupportedError,
    RoomMismatchError,
    TransportError,
)
from appliance.sync.http_transport import HttpTransport
from appliance.sync.mqtt_transport import MqttTransport
from appliance.sync.roster import ScheduleRosterProvider
from appliance.system import cpu_temperature
from appliance.update.updater import start_update_check
from cloud_sync.protocol import (
    AttendanceBatch,
    AttendanceRecord,
    BatchResult,
    Heartbeat,
    ReleaseOffer,
    ScheduleResponse,
    StoreUnlockReport,
    UpdateReport,
)

_LOGGER = logging.getLogger(__name__)

EVENTS_PER_ROUND = 50
FAILURE_LOG_EVERY_S = 300.0  # a failing aggregator: one log line per kind this often
RELEASE_CHECK_EVERY_S = 60.0  # an offered release starts the updater at most this often
REFUSED_RETRY_S = 60.0  # a refused key does not fix itself in a second: retry this slowly


@dataclass
class SyncStatus:
    """What the status page and /health show about the link to the aggregator."""

    transport: str  # "http" | "mqtt"
    connected: bool
    last_success_at: datetime | None
    last_error: str | None
    aggregator_reachable: bool
    mqtt_connected: bool | None
    credentials_refused: bool = False  # the aggregator answers, but refuses this device's key
    # the aggregator takes the key but has the device registered to another room: what to do
    room_mismatch: str | None = None


@dataclass
class DrainStats:
    """Counters since start (for logs, tests and the bench)."""

    batches: int = 0
    accepted: int = 0
    duplicate: int = 0
    parked: int = 0
    events: int = 0
    failures: int = 0
    schedule_updates: int = 0
    schedule_unchanged: int = 0
    heartbeats: int = 0


class _Uplink:
    """What the drain needs from a transport (HttpTransport and MqttTransport both fit)."""

    name: str

    def send_batch(self, batch: AttendanceBatch) -> BatchResult: ...
    def send_event(self, event: Any) -> bool: ...
    def send_heartbeat(self, heartbeat: Heartbeat) -> Any: ...


class SyncAgent:
    """Starts with ``start()`` (non-blocking, one thread), stops with ``stop()``."""

    def __init__(
        self,
        settings: ApplianceSettings,
        store: Store,
        *,
        pipeline_status: Callable[[], PipelineStatus] | None = None,
        roster_provider: ScheduleRosterProvider | None = None,
        clock: DeviceClock | None = None,
        on_contact: Callable[[bool], None] | None = None,
    ) -> None:
        """``pipeline_status`` (optional) gives the heartbeat the last frame's time and the
        fps; ``roster_provider`` is the pipeline's (the agent tells it when a new schedule is
        saved), else the agent makes one without a fallback; ``clock`` is the device's (the
        aggregator's answers give it the time; heartbeats carry it), else the system clock;
        ``on_contact`` is told of every HTTP answer of the aggregator (True: accepted, False:
        the device's key refused; the store key keeper's)."""
        sync = settings.sync
        if not sync.aggregator_url and not sync.mqtt_url:
            raise ValueError("SyncAgent needs sync.aggregator_url or sync.mqtt_url")
        self._settings = settings
        self._store = store
        self._pipeline_status = pipeline_status
        device = settings.device
        self.clock = clock or DeviceClock(settings.clock)
        self.roster_provider = roster_provider or ScheduleRosterProvider.for_device(
            settings, store, clock=self.clock)
        self._http: HttpTransport | None = None
        if sync.aggregator_url:
            self._http = HttpTransport(sync.aggregator_url, sync.api_key, sync.request_timeout_s,
                                       clock=self.clock, on_contact=on_contact)
        self._mqtt: MqttTransport | None = None
        if sync.mqtt_url:
            self._mqtt = MqttTransport(
                sync.mqtt_url.get_secret_value(), site=device.site, room_id=device.room_id,
                device_id=device.device_id, ack_timeout_s=sync.ack_timeout_s,
                on_roster_notice=self._on_roster_notice,
            )
        else:
            _LOGGER.info("sync over HTTP to %s", sync.aggregator_url)
        uplink: Any = self._mqtt or self._http
        self._uplink: _Uplink = uplink
        self._drain_backoff = Backoff(sync.backoff_initial_s, sync.backoff_max_s)
        self._roster_backoff = Backoff(sync.backoff_initial_s, sync.backoff_max_s)
        self._heartbeat_backoff = Backoff(sync.backoff_initial_s, sync.backoff_max_s)
        self._release_started: dict[str, float] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._roster_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_mono = time.monotonic()
        self._last_success_at: datetime | None = None
        self._last_error: str | None = None
        self._events_retry_at = 0.0
        self._next_drain = 0.0
        self._failure_log = LogThrottle(FAILURE_LOG_EVERY_S)
        self._window_unsupported = False  # an aggregator without /schedule/days
        self._has_fallback = self.roster_provider.has_fallback and \
            settings.recognition.roster_file is not None
        self.stats = DrainStats()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        if self._mqtt is not None:
            self._mqtt.start()
        self._thread = threading.Thread(target=self._run, name="sync-agent", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._mqtt is not None:
            self._mqtt.interrupt()  # a batch waiting for its ack stays in the outbox
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        if self._mqtt is not None:
            self._mqtt.close()
        if self._http is not None:
            self._http.close()

    def status(self) -> SyncStatus:
        mqtt_connected = self._mqtt.connected if self._mqtt is not None else None
        if self._mqtt is not None:
            reachable = bool(mqtt_connected) or bool(self._http and self._http.reachable)
            connected = bool(mqtt_connected)
        else:
            reachable = bool(self._http and self._http.reachable)
            connected = reachable
        return SyncStatus(
            transport=self._uplink.name,
            connected=connected,
            last_success_at=self._last_success_at,
            last_error=self._last_error,
            aggregator_reachable=reachable,
            mqtt_connected=mqtt_connected,
            credentials_refused=bool(self._http and self._http.refused
                                     and not self._http.room_mismatch),
            room_mismatch=self._http.room_mismatch if self._http else None,
        )

    def request_roster_refresh(self) -> None:
        """Pull the schedule at once (also called when the roster topic announces a change)."""
        self._roster_requested.set()
        self._wake.set()

    def _on_roster_notice(self, etag: str | None) -> None:
        _LOGGER.info("roster change announced (etag %s)", etag)
        self.request_roster_refresh()

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        sync = self._settings.sync
        next_roster = next_heartbeat = time.monotonic()
        self._next_drain = time.monotonic()
        was_ready = False
        while not self._stop.is_set():
            now = time.monotonic()
            if self._mqtt is not None:
                ready = self._mqtt.connected
                if ready and not was_ready:  # (re)connected: drain now
                    self._drain_backoff.reset()
                    self._next_drain = now
                was_ready = ready
            if self._http is not None and (
                now >= next_roster or self._roster_requested.is_set()
            ):
                self._roster_requested.clear()
                if self._refresh_schedule():
                    self._roster_backoff.reset()
                    next_roster = now + sync.roster_refresh_s
                else:
                    next_roster = now + min(sync.roster_refresh_s,
                                            self._roster_backoff.next_delay(self._refused_s()))
            if now >= next_heartbeat:
                if self._send_heartbeat():
                    self._heartbeat_backoff.reset()
                    next_heartbeat = now + sync.heartbeat_s
                else:
                    next_heartbeat = now + min(
                        sync.heartbeat_s, self._heartbeat_backoff.next_delay(self._refused_s()))
            if now >= self._next_drain:
                self._drain_step(now)
            wait = min(next_roster if self._http else float("inf"), next_heartbeat,
                       self._next_drain) - time.monotonic()
            if self._mqtt is not None and not was_ready:
                wait = min(wait, 0.5)  # notice a (re)connection quickly
            if wait > 0:
                self._wake.wait(wait)
            self._wake.clear()

    def _drain_step(self, now: float) -> None:
        try:
            more = self.drain_once()
        except TransportError as err:
            self._note_failure(f"upload: {err}")
            delay = self._drain_backoff.next_delay(max(err.retry_after_s or 0.0,
                                                       self._refused_s()))
            self._log_failure("upload", "upload failed (%s); next attempt in %.1f s", err, delay)
            self._next_drain = now + delay
            return
        self._drain_backoff.reset()
        self._next_drain = now if more else now + self._settings.sync.idle_poll_s

    def _refused_s(self) -> float:
        """The least wait before the next try while the aggregator refuses the key."""
        refused = self._http is not None and self._http.refused
        return min(REFUSED_RETRY_S, self._settings.sync.backoff_max_s) if refused else 0.0

    def _log_failure(self, kind: str, msg: str, *args: object) -> None:
        """One line per kind of failure every few minutes (with a count), not one per retry;
        a refused key is one warning that says what to do, whichever request met it."""
        refused = self._http.refused if self._http is not None else None
        mismatch = self._http.room_mismatch if self._http is not None else None
        if mismatch:
            self._failure_log.log(
                _LOGGER, logging.WARNING, "refused",
                "the aggregator refuses device %s's requests: %s; records are kept and sent "
                "once the rooms agree", self._settings.device.device_id, mismatch)
            return
        if refused:
            self._failure_log.log(
                _LOGGER, logging.WARNING, "refused",
                "the aggregator refuses this device's key (%s): check sync.api_key (with "
                "`make run`: data/local-sync.env) and that device %s is registered there "
                "(`aggregator devices add`); records are kept and sent once it is accepted",
                refused, self._settings.device.device_id)
            return
        self._failure_log.log(_LOGGER, logging.INFO, kind, msg, *args)

    def _note_success(self) -> None:
        if self._last_error is not None or self._last_success_at is None:
            for kind in ("refused", "upload", "schedule", "heartbeat"):
                self._failure_log.reset(kind)
        self._last_success_at = datetime.now(UTC)
        self._last_error = None
        if self._drain_backoff.failures:
            # The aggregator answers again: drain now instead of waiting out the back-off.
            self._drain_backoff.reset()
            self._next_drain = time.monotonic()

    def _note_failure(self, message: str) -> None:
        self._last_error = message
        self.stats.failures += 1
        metrics.SYNC_RESULTS.labels("failure").inc()

    # -- outbox ------------------------------------------------------------------------------
    def drain_once(self) -> bool:
        """Send one batch of records and a few events; True if more may be waiting.

        Raises :class:`TransportError` (nothing was marked that was not acknowledged).
        """
        limit = self._settings.sync.batch_size
        records = self._store.unsent_records(limit)
        if records:
            self._send_records(records)
        events_more = self._drain_events()
        metrics.OUTBOX_DEPTH.set(self._store.outbox_depth())
        return len(records) >= limit or events_more

    def _send_records(self, records: list[AttendanceRecord]) -> None:
        batch = AttendanceBatch(device_id=self._settings.device.device_id, records=records)
        try:
            result = self._uplink.send_batch(batch)
        except RoomMismatchError as err:
            if not self._made_elsewhere(err):
                raise  # still configured for a room it is not registered to: kept, retried
            for record in records:
                self._park(record.key, f"refused: {err}")
            return
        except BatchRefusedError as err:
            if len(records) == 1:
                self._park(records[0].key, f"refused: {err.reason}")
                return
            # Find the poison record(s): each half on its own.
            half = len(records) // 2
            _LOGGER.warning("batch of %d refused (%s); splitting", len(records), err.reason)
            self._send_records(records[:half])
            self._send_records(records[half:])
            return
        self._apply_result(records, result)

    def _apply_result(self, records: list[AttendanceRecord], result: BatchResult) -> None:
        sent = {str(r.key): r.key for r in records}
        rejected: dict[str, str] = {}
        for rejection in result.rejected:
            try:
                key = str(uuid.UUID(rejection.key))
            except ValueError:
                key = rejection.key
            if key in sent:
                rejected[key] = rejection.reason
            else:
                _LOGGER.warning("ack rejects key %s that was not in the batch", rejection.key)
        delivered = [k for s, k in sent.items() if s not in rejected]
        if result.accepted + result.duplicate != len(delivered):
            raise TransportError(
                f"ack counts do not match the batch: {result.accepted} accepted + "
                f"{result.duplicate} duplicate + {len(rejected)} rejected != {len(records)}"
            )
        for key, reason in rejected.items():
            self._park(sent[key], reason)
        self._store.mark_sent(delivered)
        self.stats.batches += 1
        self.stats.accepted += result.accepted
        self.stats.duplicate += result.duplicate
        metrics.SYNC_RESULTS.labels("success").inc()
        self._note_success()
        _LOGGER.debug("batch of %d: %d accepted, %d duplicate, %d rejected", len(records),
                      result.accepted, result.duplicate, len(rejected))

    def _made_elsewhere(self, err: RoomMismatchError) -> bool:
        """The refused data names a room the device is no longer configured for: made before
        an operator corrected ``device.room_id``, the aggregator will never take it. Parked
        (kept on the device, with the reason) instead of blocking the outbox forever."""
        return err.configured_room != self._settings.device.room_id

    def _park(self, key: uuid.UUID, reason: str) -> None:
        _LOGGER.warning("parking record %s: %s", key, reason)
        self._store.park(key, reason[:500])
        self.stats.parked += 1

    def _drain_events(self) -> bool:
        if time.monotonic() < self._events_retry_at:
            return False
        events = self._store.unsent_events(EVENTS_PER_ROUND)
        for event in events:
            try:
                self._uplink.send_event(event)
            except NotSupportedError as err:
                _LOGGER.warning("%s: events stay in the outbox, retry later", err)
                self._events_retry_at = time.monotonic() + self._settings.sync.roster_refresh_s
                return False
            except BatchRefusedError as err:
                self._park(event.key, f"refused: {err.reason}")
                continue
            except RoomMismatchError as err:
                if not self._made_elsewhere(err):
                    raise
                self._park(event.key, f"refused: {err}")
                continue
            self._store.mark_sent([event.key])
            self.stats.events += 1
            self._note_success()
        return len(events) >= EVENTS_PER_ROUND

    # -- schedule ----------------------------------------------------------------------------
    def _refresh_schedule(self) -> bool:
        assert self._http is not None
        room_id = self._settings.device.room_id
        cached = self._store.load_schedule()
        etag = cached[1] if cached else None
        try:
            fetched = self._fetch_schedules(room_id, etag)
        except CredentialsRefusedError as err:
            # Deregistered (or the key was rotated): the rosters are not ours to keep (the
            # store logs what it wiped, once); the refusal is one throttled warning.
            self._last_error = f"schedule: {err}"
            if self._store.wipe_rosters():
                self.roster_provider.invalidate()
            self._log_failure("schedule", "schedule pull refused: %s; cached rosters wiped", err)
            return False
        except TransportError as err:
            if cached is not None:
                self._log_failure("schedule", "schedule pull failed: %s (using the cached one "
                                  "of %s)", err, cached[0].date)
            else:
                self._log_failure(
                    "schedule", "schedule pull failed: %s; no schedule cached yet, so no class "
                    "is known: %s until a pull succeeds", err,
                    "recognition.roster_file is the roster" if self._has_fallback
                    else "every face is unknown")
            self._last_error = f"schedule: {err}"
            return False
        self._note_success()
        if fetched is None:
            self.stats.schedule_unchanged += 1
            return True
        schedules, new_etag = fetched
        self._store.save_schedules(schedules, new_etag)
        self.roster_provider.invalidate()
        self.stats.schedule_updates += 1
        first = schedules[0]
        _LOGGER.info(
            "schedule of %s for %s: %d classes, %d students%s", first.date, room_id,
            len(first.sessions), sum(len(r) for r in first.rosters.values()),
            f"; and of {', '.join(str(s.date) for s in schedules[1:])} (kept for offline)"
            if len(schedules) > 1 else "")
        return True

    def _fetch_schedules(self, room_id: str,
                         etag: str | None) -> tuple[list[ScheduleResponse], str | None] | None:
        """Today's and the next ``sync.roster_days`` school days' schedules (None: unchanged);
        an aggregator without the days endpoint gives today's only."""
        assert self._http is not None
        embedder = self._settings.recognition.embedder
        if not self._window_unsupported:
            try:
                window = self._http.fetch_schedule_window(room_id, etag, embedder,
                                                          self._settings.sync.roster_days)
            except NotSupportedError as err:
                _LOGGER.warning("%s: caching today's roster only (update the aggregator)", err)
                self._window_unsupported = True
            else:
                return None if window is None else (window[0].per_day(), window[1])
        single = self._http.fetch_schedule(room_id, etag, embedder)
        return None if single is None else ([single[0]], single[1])

    # -- heartbeat ---------------------------------------------------------------------------
    def build_heartbeat(self) -> Heartbeat:
        clock = self.clock.reading()
        now = clock.at
        last_frame_at = fps = placement = None
        if self._pipeline_status is not None:
            try:
                status = self._pipeline_status()
                last_frame_at, fps = status.last_frame_at, status.fps
                placement = placement_report(getattr(status, "placement", None))
            except Exception:  # the heartbeat must go out even if the pipeline is broken
                _LOGGER.exception("pipeline status unavailable for the heartbeat")
        return Heartbeat(
            device_id=self._settings.device.device_id,
            room_id=self._settings.device.room_id,
            software_version=software_version,
            sent_at=now,
            clock_synced=clock.trusted,
            boot_id=clock.boot_id,
            monotonic_s=clock.monotonic_s,
            clock_source=clock.source,
            uptime_s=max(0.0, time.time() - psutil.boot_time()),
            cpu_temp_c=cpu_temperature(),
            outbox_depth=self._store.outbox_depth(),
            oldest_unsent_age_s=self._store.oldest_unsent_age_s(now),
            last_frame_at=last_frame_at,
            fps=fps,
            placement=placement,
            store_unlock=self._store_unlock(),
            update=self._update_report(),
        )

    def _store_unlock(self) -> StoreUnlockReport | None:
        describe = getattr(self._store, "unlock_info", None)
        if describe is None:
            return None
        try:
            info = describe()
            return StoreUnlockReport.model_validate(
                {k: info.get(k) for k in StoreUnlockReport.model_fields})
        except Exception:  # the heartbeat must go out
            _LOGGER.exception("store unlock state unavailable for the heartbeat")
            return None

    def _update_report(self) -> UpdateReport | None:
        """The updater's last report (update/state.json), repeated in every heartbeat."""
        if not self._settings.update.enabled:
            return None
        from appliance.update.state import Layout, read_report

        return read_report(Layout(self._settings.update.prefix))

    def _send_heartbeat(self) -> bool:
        try:
            reply = self._uplink.send_heartbeat(self.build_heartbeat())
        except TransportError as err:
            self._log_failure("heartbeat", "heartbeat failed: %s", err)
            self._last_error = f"heartbeat: {err}"
            return False
        self.stats.heartbeats += 1
        self._note_success()
        if isinstance(reply, ReleaseOffer):
            self._on_release(reply)
        return True

    def _on_release(self, offer: ReleaseOffer) -> None:
        """The heartbeat reply names a release for this device: start the updater (its own
        process: it restarts this one), at most once a minute per offered release."""
        if not self._settings.update.enabled or offer.version == software_version:
            return
        now = time.monotonic()
        last = self._release_started.get(offer.version)
        if last is not None and now - last < RELEASE_CHECK_EVERY_S:
            return
        self._release_started[offer.version] = now
        try:
            start_update_check(self._settings, offer)
        except OSError as err:
            _LOGGER.warning("could not start the update check: %s", err)
