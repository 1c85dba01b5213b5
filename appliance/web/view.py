"""What the status page shows: :class:`StatusView` gathers the pipeline's status, the store,
the sync agent's status, the host's readings and the health into one JSON-ready dict (the page,
``/api/status`` and the SSE stream alike), in words a teacher reads."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import appliance
from appliance import metrics
from appliance.config import ApplianceSettings
from appliance.health import (
    CAMERA_OK,
    NOT_CONFIGURED,
    ClockSource,
    PipelineSource,
    StoreSource,
    SyncStatusFn,
    SyncStatusLike,
    check_health,
    read_sync_status,
    store_unlock,
)
from appliance.store import STORE_ERRORS
from appliance.system import SystemSnapshot
from cloud_sync.words import MatchBands, match_bands, match_label, recogniser

_LOGGER = logging.getLogger(__name__)

_CREDENTIALS_IN_URL = re.compile(r"(?<=://)[^/@\s]+@")


def mask_url(source: str) -> str:
    """Hide ``user:password@`` in a camera URL (rtsp://user:pw@host/...)."""
    return _CREDENTIALS_IN_URL.sub("***@", source)


def _mask_optional(text: str | None) -> str | None:
    return None if text is None else mask_url(text)


def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        _LOGGER.warning("unknown time zone %r; showing UTC", name)
        return UTC


def preview_note(state: str, frames: int, error: str | None) -> str | None:
    """Why there is no camera picture to show (None: there is one)."""
    why = f" ({error})" if error else ""
    if state == CAMERA_OK:
        return None if frames else "Waiting for the first picture from the camera."
    if state == "starting":
        return "The camera is starting: waiting for its first picture."
    if state == "reopening":
        return f"The camera stopped delivering pictures{why}; the device keeps trying to reopen it."
    if state == "ended":
        return "The video used as the camera has ended (camera.loop_file is off)."
    return (f"The camera cannot be opened{why}. Check that it is connected, or set "
            "camera.source in the device's configuration.")


def _round(value: float | None, digits: int = 1) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(value, digits)


class StatusView:
    """Collects everything the page shows into one JSON-ready dict (page, /api and SSE alike)."""

    def __init__(self, settings: ApplianceSettings, pipeline: PipelineSource, store: StoreSource,
                 sync_status: SyncStatusFn | None,
                 system: Callable[[], SystemSnapshot],
                 clock: ClockSource | None = None) -> None:
        self.settings = settings
        rec = settings.recognition  # the match words of this device's embedder and threshold
        self.bands: MatchBands = match_bands(rec.embedder, rec.threshold)
        self.clock = clock
        self.pipeline = pipeline
        self.store = store
        self.sync_status = sync_status
        self.system = system
        self.zone = _zone(settings.device.timezone)
        self._cache: tuple[float, dict[str, Any]] | None = None
        self._cache_lock = threading.Lock()

    def cached(self, max_age_s: float) -> dict[str, Any]:
        """:meth:`build`, shared by every open page for ``max_age_s`` (several viewers on a Pi
        must not multiply the work)."""
        with self._cache_lock:
            now = time.monotonic()
            if self._cache is None or now - self._cache[0] > max_age_s:
                self._cache = (now, self.build())
            return self._cache[1]

    def _local(self, when: datetime | None, fmt: str = "%H:%M:%S") -> str | None:
        return None if when is None else when.astimezone(self.zone).strftime(fmt)

    def _last_sync(self, sync: SyncStatusLike | None) -> str:
        if not (self.settings.sync.aggregator_url or self.settings.sync.mqtt_url):
            return "not configured (offline)"
        if sync is None:
            return "sync agent not running"
        if sync.last_success_at is None:
            return "never"
        return self._local(sync.last_success_at, "%Y-%m-%d %H:%M:%S") or "never"

    def _store_line(self, locked: bool) -> str:
        """The store's mode: locked and why, unlocked online, unlocked offline with the days
        left (the store key keeper's line), or encrypted / not encrypted."""
        unlock = store_unlock(self.store)
        if unlock is not None and unlock.get("message"):
            return str(unlock["message"])
        if locked:
            return "locked: " + (getattr(self.store, "lock_reason", None) or "no key")
        return "encrypted" if getattr(self.store, "encrypted", False) else "not encrypted"

    def build(self) -> dict[str, Any]:
        now = datetime.now(UTC)
        st = self.pipeline.status()
        system = self.system()
        sync = read_sync_status(self.sync_status)
        locked = bool(getattr(self.store, "locked", False))
        depth = None if locked else self.store.outbox_depth()
        oldest = None if locked else self.store.oldest_unsent_age_s(now)
        present = sorted(st.present, key=lambda p: p.first_seen)
        health = check_health(self.settings, self.pipeline, self.store, system,
                              self.sync_status, now, clock=self.clock)
        clock = health["components"]["clock"]
        sync_cfg = self.settings.sync
        return {
            "version": appliance.__version__,
            "device_id": self.settings.device.device_id,
            "room_id": st.room_id or self.settings.device.room_id,
            "now": self._local(now, "%Y-%m-%d %H:%M:%S %Z"),
            "course_id": st.course_id,
            "course_name": st.course_name,
            "class_line": class_line(st.course_id, st.course_name, clock),
            "roster_size": st.roster_size,
            "note": st.note,
            "camera": {
                "source": mask_url(st.camera_source),
                "state": st.camera_state,
                "ok": st.camera_state == CAMERA_OK,
                "fps": _round(st.fps),
                "frames": st.frames,
                "last_frame_at": self._local(st.last_frame_at),
                "error": _mask_optional(st.camera_error),
                "preview_note": preview_note(
                    st.camera_state, st.frames, _mask_optional(st.camera_error)),
            },
            "stage_ms": {name: _round(ms) for name, ms in st.stage_ms.items()},
            "placement": placement_view(getattr(st, "placement", None)),
            "present": [
                {"student_id": p.student_id, "name": p.name,
                 "first_seen": self._local(p.first_seen),
                 "confidence": _round(p.confidence, 2),
                 "match": match_label(p.confidence, self.bands)}
                for p in present
            ],
            "match_bands": {"recogniser": recogniser(self.bands.embedder),
                            "clear": self.bands.clear, "good": self.bands.good},
            "unknown_count": st.unknown_count,
            "tracks_active": st.tracks_active,
            "sync": {
                "configured": bool(sync_cfg.aggregator_url or sync_cfg.mqtt_url),
                "transport": sync.transport if sync else None,
                "connected": sync.connected if sync else False,
                "last_success_at": self._local(sync.last_success_at, "%Y-%m-%d %H:%M:%S")
                if sync else None,
                "last_sync": self._last_sync(sync),
                "last_error": _mask_optional(sync.last_error) if sync else None,
                "outbox_depth": depth,
                "oldest_unsent_age_s": _round(oldest, 0),
                "store": self._store_line(locked),
            },
            "system": {
                "cpu_percent": _round(system.cpu_percent),
                "load_1m": system.load_1m,
                "cpu_count": system.cpu_count,
                "cpu_temp_c": _round(system.cpu_temp_c),
                "memory_percent": _round(system.memory_percent),
                "memory_available_mb": _round(system.memory_available_mb, 0),
                "disk_percent": _round(system.disk_percent),
                "disk_free_gb": _round(system.disk_free_gb),
            },
            "health": {name: c["status"] for name, c in health["components"].items()},
            "health_status": health["status"],
            "provisioning": health["components"]["provisioning"]["message"],
            "clock": {"trusted": clock.get("trusted"), "source": clock.get("source"),
                      "configured": clock["status"] != NOT_CONFIGURED,
                      "message": clock["message"],
                      "warning": "" if clock.get("trusted", True) else
                      "Clock not trusted: " + clock["message"]},
        }


def placement_view(summary: Any) -> dict[str, Any] | None:
    """The placement check for the page: verdict, hint, and the size bands that have faces."""
    if summary is None:
        return None
    return {
        "status": summary.status,
        "ok": summary.status in ("ok", "marginal", "no_data"),
        "hint": summary.hint,
        "faces": summary.faces,
        "recognised": summary.recognised,
        "median_px": summary.median_px,
        "which": "this class so far" if summary.current_class else "the last class",
        "bands": [{"size": size, "faces": faces, "recognised": rec}
                  for size, faces, rec in summary.bands if faces],
    }


def class_line(course_id: str | None, course_name: str | None,
               clock: dict[str, Any]) -> str:
    """The "Class now" headline."""
    if course_id:
        return f"{course_name or course_id} ({course_id})"
    if clock.get("trusted") is False:
        return "No class chosen: the clock is not trusted"
    return "No class scheduled"


def refresh_gauges(pipeline: PipelineSource, store: StoreSource, system: SystemSnapshot) -> None:
    """Set the gauges that describe "now" (called on every scrape)."""
    try:
        st = pipeline.status()
    except Exception:  # the scrape must still answer
        _LOGGER.exception("metrics: pipeline status failed")
        metrics.CAMERA_UP.set(0)
    else:
        metrics.FPS.set(st.fps)
        metrics.CAMERA_UP.set(1 if st.camera_state == CAMERA_OK else 0)
    try:
        metrics.OUTBOX_DEPTH.set(store.outbox_depth())
    except (*STORE_ERRORS, OSError) as err:
        _LOGGER.warning("metrics: outbox depth unreadable: %s", err)
    temp = system.cpu_temp_c
    metrics.CPU_TEMPERATURE.set(float("nan") if temp is None else temp)
