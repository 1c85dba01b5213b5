"""Per-component health of the appliance, for ``GET /health`` (open: no personal data).

Shape (like a classic health checker)::

    {"status": "healthy", "timestamp": "2026-...Z", "version": "0.1.0",
     "components": {"camera": {"status": "healthy", "healthy": true, "message": "..."}, ...}}

Each component is ``healthy``, ``degraded``, ``unhealthy`` or ``not_configured``; ``healthy``
(the boolean) is false only for ``unhealthy``. The overall status is the worst of the configured
components. Messages never carry names, faces, URLs or error texts that may contain credentials.

The pipeline's status is :class:`appliance.status.PipelineStatus` itself; what the status page,
health and alerts consume of the pipeline object, the store and the sync agent's status are
declared here as Protocols, so health depends on what it reads and not on the concrete classes
(the tests pass small fakes of the pipeline, the host readings and the sync status).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import appliance
from appliance.clock import ClockState
from appliance.config import ApplianceSettings
from appliance.status import PipelineStatus
from appliance.store import STORE_ERRORS, WriteFailure
from appliance.system import SystemSnapshot
from cloud_sync.protocol import Event

_LOGGER = logging.getLogger(__name__)

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
NOT_CONFIGURED = "not_configured"
_RANK = {NOT_CONFIGURED: -1, HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}

COMPONENTS = ("camera", "detector", "recogniser", "database", "clock", "aggregator", "mqtt",
              "disk", "temperature", "provisioning")
# Written by the first boot of a card made with `make flash` (fleet.firstboot).
PROVISIONING_FILE = "provisioning.json"
# A stage slower than this on average (ms) makes its component "degraded": a Pi 4 needs
# roughly 5x this machine's time, and the pipeline stays useful well below 1 frame/s.
SLOW_STAGE_MS = 2000.0
# Camera states of the pipeline contract.
CAMERA_OK = "ok"
CAMERA_TRANSIENT = ("starting", "reopening")


# --- what we consume (structural types) ---------------------------------------------------------

class PipelineSource(Protocol):
    def status(self) -> PipelineStatus: ...
    def latest_preview_jpeg(self) -> bytes | None: ...


class StoreSource(Protocol):
    write_failure: WriteFailure | None  # the last failed write, until a write succeeds

    def add_event(self, event: Event) -> None: ...
    def outbox_depth(self) -> int: ...
    def oldest_unsent_age_s(self, now: datetime | None = None) -> float | None: ...
    def get_state(self, key: str) -> str | None: ...
    def set_state(self, key: str, value: str) -> None: ...


class SyncStatusLike(Protocol):
    transport: str
    connected: bool
    last_success_at: datetime | None
    last_error: str | None
    aggregator_reachable: bool
    mqtt_connected: bool | None
    credentials_refused: bool
    room_mismatch: str | None


SyncStatusFn = Callable[[], SyncStatusLike | None]


class ClockSource(Protocol):
    """The device's clock (appliance.clock.DeviceClock)."""

    def state(self) -> ClockState: ...


# --- result ----------------------------------------------------------------------------------

@dataclass(slots=True)
class ComponentHealth:
    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "healthy": self.status != UNHEALTHY,
                "message": self.message, **self.details}


def overall_status(components: Mapping[str, ComponentHealth]) -> str:
    """Worst status of the configured components (healthy when none is configured)."""
    worst = HEALTHY
    for item in components.values():
        if _RANK[item.status] > _RANK[worst]:
            worst = item.status
    return worst


def _age_s(then: datetime | None, now: datetime) -> float | None:
    return None if then is None else max(0.0, (now - then).total_seconds())


def _fmt_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- individual checks -------------------------------------------------------------------------

def check_camera(st: PipelineStatus, now: datetime, offline_s: float) -> ComponentHealth:
    details: dict[str, Any] = {"state": st.camera_state, "fps": round(st.fps, 2)}
    age = _age_s(st.last_frame_at, now)
    if age is not None:
        details["last_frame_age_s"] = round(age, 1)
    if st.camera_state == CAMERA_OK:
        if age is not None and age > max(offline_s, 5.0):
            return ComponentHealth(DEGRADED, f"no frame for {_fmt_age(age)}", details)
        return ComponentHealth(HEALTHY, f"delivering frames at {st.fps:.1f} fps", details)
    if st.camera_state in CAMERA_TRANSIENT:
        return ComponentHealth(DEGRADED, f"camera {st.camera_state}", details)
    return ComponentHealth(UNHEALTHY, f"camera {st.camera_state}", details)


def _stage_check(st: PipelineStatus, stage: str, what: str) -> ComponentHealth | None:
    ms = st.stage_ms.get(stage)
    if ms is None:
        return None
    if ms > SLOW_STAGE_MS:
        return ComponentHealth(DEGRADED, f"{what} slow: {ms:.0f} ms", {f"{stage}_ms": ms})
    return None


def check_detector(st: PipelineStatus) -> ComponentHealth:
    details: dict[str, Any] = {"frames": st.frames}
    if "detect" in st.stage_ms:
        details["detect_ms"] = round(st.stage_ms["detect"], 1)
    slow = _stage_check(st, "detect", "detection")
    if slow is not None:
        slow.details.update(details)
        return slow
    if st.frames == 0:
        if st.camera_state == CAMERA_OK or st.camera_state in CAMERA_TRANSIENT:
            return ComponentHealth(DEGRADED, "no frame processed yet", details)
        return ComponentHealth(UNHEALTHY, "no frame processed (camera down)", details)
    return ComponentHealth(HEALTHY, f"{st.frames} frames processed", details)


def check_recogniser(st: PipelineStatus) -> ComponentHealth:
    details: dict[str, Any] = {"class_in_session": st.course_id is not None,
                               "recognised": len(st.present), "unknown": st.unknown_count}
    if "embed" in st.stage_ms:
        details["embed_ms"] = round(st.stage_ms["embed"], 1)
    slow = _stage_check(st, "embed", "face descriptors")
    if slow is not None:
        slow.details.update(details)
        return slow
    if st.course_id is None:
        return ComponentHealth(HEALTHY, "no class scheduled now", details)
    return ComponentHealth(
        HEALTHY, f"{len(st.present)} recognised, {st.unknown_count} unknown", details
    )


def check_database(store: StoreSource, now: datetime, max_age_s: float,
                   system: SystemSnapshot | None = None) -> ComponentHealth:
    free = {} if system is None else {"disk_free_mb": round(system.disk_free_gb * 1024)}
    unlock = store_unlock(store)
    if unlock is not None:
        free["unlock"] = unlock
    if getattr(store, "locked", False):  # encrypted, and its key has not arrived
        since = getattr(store, "locked_since", None)
        when = f" since {since:%Y-%m-%d %H:%M:%S} UTC" if since else ""
        return ComponentHealth(
            UNHEALTHY, f"store locked{when}: {getattr(store, 'lock_reason', None) or 'no key'}"
            "; nothing is recognised or recorded until the aggregator hands out its key",
            {"locked": True, "encrypted": True, "write_ok": False, **free})
    failure = store.write_failure
    if failure is not None:  # a full disk: records are not being saved
        why = "the disk is full" if failure.disk_full else "see the device log"
        return ComponentHealth(
            UNHEALTHY, f"outbox writes failing since {failure.at:%Y-%m-%d %H:%M:%S} UTC "
            f"({why}): new records are not saved",
            {"write_ok": False, "write_failed_at": failure.at.isoformat().replace("+00:00", "Z"),
             "disk_full": failure.disk_full, **free})
    try:
        depth = store.outbox_depth()
        age = store.oldest_unsent_age_s(now)
    except (*STORE_ERRORS, OSError) as err:
        _LOGGER.warning("health: store unreadable: %s", err)
        return ComponentHealth(UNHEALTHY, f"store unreadable ({type(err).__name__})", free)
    details: dict[str, Any] = {"outbox_depth": depth,
                               "oldest_unsent_age_s": None if age is None else round(age, 1),
                               "write_ok": True, "locked": False,
                               "encrypted": bool(getattr(store, "encrypted", False)), **free}
    mode = "" if unlock is None or unlock.get("mode") == "online" else \
        f"; store {unlock.get('message')}"
    if age is not None and age > max_age_s:
        return ComponentHealth(DEGRADED, f"outbox not drained for {_fmt_age(age)}{mode}",
                               details)
    return ComponentHealth(HEALTHY, f"{depth} unsent{mode}", details)


def store_unlock(store: StoreSource) -> dict[str, Any] | None:
    """How the encrypted store was unlocked (appliance/sync/store_key.py's KeyKeeper), or None
    (an unencrypted store, a test double)."""
    describe = getattr(store, "unlock_info", None)
    if describe is None:
        return None
    try:
        info = describe()
    except Exception:  # health must answer whatever happens
        _LOGGER.exception("health: store unlock state unavailable")
        return None
    return info if isinstance(info, dict) else None


def check_clock(clock: ClockSource | None) -> ComponentHealth:
    """Trusted (NTP, the aggregator's time, this boot's anchor, an RTC) or not, and why."""
    if clock is None:
        return ComponentHealth(NOT_CONFIGURED, "no device clock")
    state = clock.state()
    return ComponentHealth(HEALTHY if state.trusted else DEGRADED, state.message,
                           state.as_dict())


def check_aggregator(settings: ApplianceSettings, sync: SyncStatusLike | None,
                     now: datetime) -> ComponentHealth:
    if not settings.sync.aggregator_url:
        return ComponentHealth(NOT_CONFIGURED, "no aggregator_url: offline only")
    if sync is None:
        return ComponentHealth(DEGRADED, "sync agent not running; records kept locally")
    age = _age_s(sync.last_success_at, now)
    details = {"last_success_age_s": None if age is None else round(age, 1)}
    if sync.room_mismatch:
        return ComponentHealth(
            DEGRADED, f"reachable, but it refuses this device's room: {sync.room_mismatch}; "
            "records kept locally", details)
    if sync.credentials_refused:
        return ComponentHealth(
            DEGRADED, "reachable, but it refuses this device's key (HTTP 401/403): check "
            "sync.api_key and the device's registration; records kept locally", details)
    if sync.aggregator_reachable:
        return ComponentHealth(HEALTHY, "reachable", details)
    return ComponentHealth(DEGRADED, "unreachable; records kept locally", details)


def check_mqtt(settings: ApplianceSettings, sync: SyncStatusLike | None) -> ComponentHealth:
    if not settings.sync.mqtt_url:
        return ComponentHealth(NOT_CONFIGURED, "no mqtt_url")
    if sync is None:
        return ComponentHealth(DEGRADED, "sync agent not running")
    if sync.mqtt_connected:
        return ComponentHealth(HEALTHY, "connected")
    return ComponentHealth(DEGRADED, "not connected; records kept locally")


def check_disk(system: SystemSnapshot, settings: ApplianceSettings) -> ComponentHealth:
    free_mb = round(system.disk_free_gb * 1024)
    details = {"disk_percent": system.disk_percent, "disk_free_gb": system.disk_free_gb,
               "disk_free_mb": free_mb}
    text = f"{system.disk_percent:.0f} % used, {system.disk_free_gb:.1f} GB free"
    if free_mb < settings.alerts.disk_min_free_mb:
        return ComponentHealth(UNHEALTHY, f"{text}: below {settings.alerts.disk_min_free_mb} MB",
                               details)
    if system.disk_percent >= settings.alerts.disk_critical_percent:
        return ComponentHealth(UNHEALTHY, text, details)
    if system.disk_percent >= settings.alerts.disk_max_percent:
        return ComponentHealth(DEGRADED, text, details)
    return ComponentHealth(HEALTHY, text, details)


def check_temperature(system: SystemSnapshot, settings: ApplianceSettings) -> ComponentHealth:
    temp = system.cpu_temp_c
    if temp is None:
        return ComponentHealth(NOT_CONFIGURED, "no temperature sensor")
    details = {"cpu_temp_c": temp}
    if temp >= settings.alerts.cpu_temp_critical_c:
        return ComponentHealth(UNHEALTHY, f"{temp:.1f} °C: throttling", details)
    if temp >= settings.alerts.cpu_temp_max_c:
        return ComponentHealth(DEGRADED, f"{temp:.1f} °C: hot", details)
    return ComponentHealth(HEALTHY, f"{temp:.1f} °C", details)


def check_provisioning(data_dir: Path) -> ComponentHealth:
    """Whether first boot applied the card's settings, and what is still missing."""
    try:
        doc = json.loads((data_dir / PROVISIONING_FILE).read_text())
    except FileNotFoundError:
        return ComponentHealth(NOT_CONFIGURED, "no first-boot record (installed by hand)")
    except (OSError, ValueError):
        return ComponentHealth(DEGRADED, "first-boot record unreadable")
    if doc.get("provisioned"):
        return ComponentHealth(HEALTHY, "provisioned", {"provisioned": True})
    missing = [str(m) for m in doc.get("missing") or []] or ["unknown"]
    return ComponentHealth(DEGRADED, "not provisioned: " + "; ".join(missing),
                           {"provisioned": False, "missing": missing})


# --- all together ------------------------------------------------------------------------------

def check_health(
    settings: ApplianceSettings,
    pipeline: PipelineSource,
    store: StoreSource,
    system: SystemSnapshot,
    sync_status: SyncStatusFn | None = None,
    now: datetime | None = None,
    clock: ClockSource | None = None,
) -> dict[str, Any]:
    """The /health document. Never raises for a failing component: it reports it."""
    now = now or datetime.now(UTC)
    components: dict[str, ComponentHealth] = {}
    try:
        st = pipeline.status()
    except Exception as err:  # a broken pipeline must show up as unhealthy, not as a 500
        _LOGGER.exception("health: pipeline status failed")
        down = ComponentHealth(UNHEALTHY, f"pipeline status unavailable ({type(err).__name__})")
        components.update(camera=down, detector=down, recogniser=down)
    else:
        components["camera"] = check_camera(st, now, settings.alerts.camera_offline_s)
        components["detector"] = check_detector(st)
        components["recogniser"] = check_recogniser(st)
    components["database"] = check_database(store, now, settings.alerts.outbox_max_age_s,
                                            system)
    try:
        components["clock"] = check_clock(clock)
    except Exception as err:  # a clock bug must show, not take /health down
        _LOGGER.exception("health: clock state failed")
        components["clock"] = ComponentHealth(DEGRADED, f"clock unreadable ({type(err).__name__})")
    sync = read_sync_status(sync_status)
    components["aggregator"] = check_aggregator(settings, sync, now)
    components["mqtt"] = check_mqtt(settings, sync)
    components["disk"] = check_disk(system, settings)
    components["temperature"] = check_temperature(system, settings)
    components["provisioning"] = check_provisioning(settings.paths.data_dir)
    return {
        "status": overall_status(components),
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "version": appliance.__version__,
        "components": {name: components[name].as_dict() for name in COMPONENTS},
    }


def read_sync_status(sync_status: SyncStatusFn | None) -> SyncStatusLike | None:
    """The sync agent's status, or None when there is no agent or it fails to answer."""
    if sync_status is None:
        return None
    try:
        return sync_status()
    except Exception:  # the agent's bug must not take the status page down
        _LOGGER.exception("sync status failed")
        return None
