"""Device alerts, written to the store's outbox as protocol ``Event`` rows (sync sends them).

Watched every ``alerts.period_s`` seconds:

- ``camera_offline`` when the camera state has not been ``ok`` for more than
  ``alerts.camera_offline_s``, and ``camera_online`` when it is back;
- ``cpu_temperature_high`` above ``alerts.cpu_temp_max_c`` (re-armed ``cpu_temp_clear_c`` below);
- ``disk_almost_full`` above ``alerts.disk_max_percent`` (re-armed ``disk_clear_percent`` below);
- ``outbox_stale`` when the oldest unsent row is older than ``alerts.outbox_max_age_s``
  (re-armed once the outbox has drained below that age).

Each alert is raised once per episode, not once per period. The raised/clear state of each
alert is kept in the store (``alerts.<name>``), so a restart in the middle of an episode does
not send it twice, and a camera that was offline before a restart gets its ``camera_online``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance import metrics
from appliance.config import ApplianceSettings
from appliance.health import CAMERA_OK, PipelineSource, StoreSource
from appliance.system import SystemSnapshot, read_system
from cloud_sync.protocol import AlertPayload, Event, make_session_id

_LOGGER = logging.getLogger(__name__)

RAISED = "raised"
CLEAR = "clear"
ALERTS = ("camera", "temperature", "disk", "outbox")


def alert_event(settings: ApplianceSettings, kind: str, severity: str, message: str,
                at: datetime, details: dict[str, Any], *, course_id: str | None = None,
                associated: list[str] | None = None) -> Event:
    """An alert in the one event shape: ``data`` is an :class:`AlertPayload` (the
    ``alert.triggered`` shape: level, message, associated events, details); the session is
    the class running now, if any."""
    payload = AlertPayload(
        alert_level=severity.upper(),  # type: ignore[arg-type]
        alert_message=message,
        associated_events=[uuid.UUID(k) for k in associated or []],
        details=details,
    )
    return Event(
        device_id=settings.device.device_id,
        room_id=settings.device.room_id,
        kind=kind,  # type: ignore[arg-type]  # one of protocol.AlertKind
        severity=severity,  # type: ignore[arg-type]
        message=message,
        at=at,
        session_id=make_session_id(course_id, at.date()),
        data=payload.model_dump(mode="json"),
    )


class AlertMonitor:
    """Periodic checks in a daemon thread; ``check(now)`` runs one round (used by tests too)."""

    def __init__(
        self,
        settings: ApplianceSettings,
        pipeline: PipelineSource,
        store: StoreSource,
        *,
        system: Callable[[], SystemSnapshot] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._settings = settings
        self._cfg = settings.alerts
        self._pipeline = pipeline
        self._store = store
        data_dir: Path = settings.paths.data_dir
        self._system = system or (lambda: read_system(data_dir))
        self._clock = clock or (lambda: datetime.now(UTC))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._camera_bad_since: datetime | None = None
        self._state: dict[str, str] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        if not self._cfg.enabled:
            _LOGGER.info("alerts disabled (alerts.enabled = false)")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()
        _LOGGER.info("alert monitor started (every %.1f s)", self._cfg.period_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # keep watching: one bad round must not end the monitor
                _LOGGER.exception("alert check failed")
            self._stop.wait(self._cfg.period_s)

    # --- one round -----------------------------------------------------------------------------

    def check(self, now: datetime | None = None) -> list[Event]:
        """Evaluate every alert once; return the events written to the store this round."""
        now = now or self._clock()
        emitted: list[Event] = []
        emitted += self._check_camera(now)
        system = self._system()
        emitted += self._check_temperature(system, now)
        emitted += self._check_disk(system, now)
        emitted += self._check_outbox(now)
        return emitted

    def _is_raised(self, name: str) -> bool:
        if name not in self._state:
            self._state[name] = self._store.get_state(f"alerts.{name}") or CLEAR
        return self._state[name] == RAISED

    def _set(self, name: str, value: str) -> None:
        self._state[name] = value
        self._store.set_state(f"alerts.{name}", value)

    def _emit(self, kind: str, severity: str, message: str, now: datetime,
              data: dict[str, Any], associated: list[str] | None = None) -> Event:
        event = alert_event(self._settings, kind, severity, message, now, data,
                            course_id=self._pipeline.status().course_id,
                            associated=associated)
        self._store.add_event(event)
        metrics.ALERTS_RAISED.labels(kind=kind).inc()
        _LOGGER.warning("alert %s: %s", kind, message)
        return event

    def _check_camera(self, now: datetime) -> list[Event]:
        st = self._pipeline.status()
        if st.camera_state == CAMERA_OK:
            self._camera_bad_since = None
            if self._is_raised("camera"):
                self._set("camera", CLEAR)
                raised_by = self._store.get_state("alerts.camera.key")
                return [self._emit("camera_online", "info", "camera delivers frames again", now,
                                   {"state": st.camera_state},
                                   associated=[raised_by] if raised_by else None)]
            return []
        if self._camera_bad_since is None:
            self._camera_bad_since = now
        down_s = (now - self._camera_bad_since).total_seconds()
        if down_s > self._cfg.camera_offline_s and not self._is_raised("camera"):
            self._set("camera", RAISED)
            last = st.last_frame_at.isoformat() if st.last_frame_at else None
            event = self._emit(
                "camera_offline", "critical",
                f"camera {st.camera_state} for {down_s:.0f} s", now,
                {"state": st.camera_state, "down_s": round(down_s, 1), "last_frame_at": last},
            )
            self._store.set_state("alerts.camera.key", str(event.key))
            return [event]
        return []

    def _check_temperature(self, system: SystemSnapshot, now: datetime) -> list[Event]:
        temp = system.cpu_temp_c
        if temp is None:
            return []
        limit = self._cfg.cpu_temp_max_c
        if temp > limit and not self._is_raised("temperature"):
            self._set("temperature", RAISED)
            return [self._emit("cpu_temperature_high", "warning",
                               f"CPU temperature {temp:.1f} °C over {limit:.0f} °C", now,
                               {"cpu_temp_c": temp, "limit_c": limit})]
        if temp < limit - self._cfg.cpu_temp_clear_c and self._is_raised("temperature"):
            self._set("temperature", CLEAR)
            _LOGGER.info("CPU temperature back to %.1f °C", temp)
        return []

    def _check_disk(self, system: SystemSnapshot, now: datetime) -> list[Event]:
        used = system.disk_percent
        limit = self._cfg.disk_max_percent
        if used > limit and not self._is_raised("disk"):
            self._set("disk", RAISED)
            return [self._emit("disk_almost_full", "critical",
                               f"disk {used:.1f} % full (limit {limit:.0f} %)", now,
                               {"disk_percent": used, "disk_free_gb": system.disk_free_gb,
                                "limit_percent": limit})]
        if used < limit - self._cfg.disk_clear_percent and self._is_raised("disk"):
            self._set("disk", CLEAR)
            _LOGGER.info("disk usage back to %.1f %%", used)
        return []

    def _check_outbox(self, now: datetime) -> list[Event]:
        age = self._store.oldest_unsent_age_s(now)
        limit = self._cfg.outbox_max_age_s
        if age is not None and age > limit and not self._is_raised("outbox"):
            self._set("outbox", RAISED)
            return [self._emit("outbox_stale", "warning",
                               f"oldest unsent row waits for {age / 60:.0f} min", now,
                               {"oldest_unsent_age_s": round(age, 1),
                                "outbox_depth": self._store.outbox_depth(),
                                "limit_s": limit})]
        if (age is None or age <= limit) and self._is_raised("outbox"):
            self._set("outbox", CLEAR)
            _LOGGER.info("outbox drained")
        return []
