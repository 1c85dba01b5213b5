"""Classroom events on the device: occupancy, attention and unknown-face alerts.

:class:`ClassroomEvents` is called once per processed frame by the pipeline
(:meth:`observe`, on the processing thread). Every ``events.count_period_s`` (5 s) it runs the
counting pass (a tiled BlazeFace pass with a small minimum face size, for the 20-30 px faces of
a whole-room view; ``count_tiles = 0`` uses the pipeline's own detections), counts people
(faces + live tracks whose face is not seen), estimates each face's head pose, and writes
``occupancy`` and ``attention`` events at a bounded rate (on change, at most every
``min_interval_s``, at least every ``max_interval_s``). Unknown-face alerts follow the tracks
the pipeline decided ``unknown`` during a class. Events go to the store's outbox like every
other event; the sync agent sends them (HTTP or MQTT). Each event carries the class session
(``<course_id>@<date>``), so the aggregator keeps a timeline per session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from appliance import metrics
from appliance.alerts import alert_event
from appliance.config import ApplianceSettings
from appliance.events.attention import Attention, facing_front
from appliance.events.occupancy import Count, Occupancy, count_people
from appliance.events.rate import RateGate
from appliance.events.unknown import UnknownFaces
from appliance.tracking import Track
from cloud_sync.protocol import Event, make_session_id

_LOGGER = logging.getLogger(__name__)

YUNET_COUNT_SCORE = 0.8  # occupancy without a TFLite runtime (see ClassroomEvents._make_counter)


class EventStore(Protocol):
    def add_event(self, event: Event) -> None: ...
    def get_state(self, key: str) -> str | None: ...
    def set_state(self, key: str, value: str) -> None: ...


def _student_of(track: Track) -> str | None:
    """The student a track was decided to be (the pipeline's vote), None otherwise."""
    state = track.data.get("state")
    decision = getattr(getattr(state, "vote", None), "decision", None)
    if decision is None or getattr(decision, "verdict", None) != "present":
        return None
    return getattr(decision, "student_id", None)


def _is_unknown(track: Track) -> bool:
    state = track.data.get("state")
    decision = getattr(getattr(state, "vote", None), "decision", None)
    return getattr(decision, "verdict", None) == "unknown"


class ClassroomEvents:
    def __init__(self, settings: ApplianceSettings, store: EventStore, *,
                 counter: Any = None) -> None:
        self.settings = settings
        self.cfg = cfg = settings.events
        self.store = store
        self.counter = counter if counter is not None or cfg.count_tiles == 0 else \
            self._make_counter(settings.paths.model_dir)
        self.occupancy = Occupancy(cfg.window_s, cfg.room_capacity)
        self.attention = Attention(cfg.window_s)
        self.unknown = UnknownFaces(store, cfg.unknown_cooldown_s, cfg.unknown_several,
                                    cfg.unknown_window_s)
        self._occ_gate = RateGate(cfg.min_interval_s, cfg.max_interval_s)
        self._att_gate = RateGate(cfg.min_interval_s, cfg.max_interval_s)
        self._last_count: datetime | None = None
        self._session: str | None = None
        self._sent_occupancy: int | None = None
        self._sent_share: float | None = None
        self.counts = 0
        self.count_ms = 0.0  # total time of the counting passes

    def _make_counter(self, model_dir: Path) -> Any:
        from appliance.vision.detector import TFLiteMissingError
        from appliance.vision.detectors import create_detector

        cfg = self.cfg
        # Counting was validated against hand counts with BlazeFace on tiles (docs/RECOGNITION.md):
        # it counts with BlazeFace whatever detector recognition uses, when a TFLite runtime is
        # installed. Without one (Python 3.13 on aarch64), YuNet on the whole frame, which also
        # finds dim and partial faces: it counts higher (Hamilton frame 225: 7 where there are
        # 4 seated in the light), so its threshold is raised to YUNET_COUNT_SCORE.
        model = self.settings.detector.model
        try:
            return create_detector(model_dir, model if model != "yunet" else "full_range",
                                   score_threshold=cfg.count_score_threshold,
                                   nms_iou=self.settings.detector.nms_iou,
                                   min_face_px=cfg.count_min_face_px, tiles=cfg.count_tiles,
                                   threads=1)
        except TFLiteMissingError:
            _LOGGER.warning("no TFLite runtime: occupancy counts with YuNet")
            return create_detector(model_dir, "yunet",
                                   score_threshold=max(cfg.count_score_threshold,
                                                       YUNET_COUNT_SCORE),
                                   nms_iou=self.settings.detector.nms_iou,
                                   min_face_px=cfg.count_min_face_px, threads=1, input_width=0)

    # -- the per-frame hook -----------------------------------------------------------------
    def observe(self, image: np.ndarray, now: datetime, tracks: Sequence[Track],
                course_id: str | None, roster_size: int) -> None:
        """One processed frame (processing thread). Cheap except every count_period_s."""
        session = make_session_id(course_id, now.date())
        if session != self._session:
            self._switch(session)
        if self.cfg.unknown_alert and course_id is not None and roster_size > 0:
            self._unknown(now, tracks)
        if (self._last_count is not None
                and (now - self._last_count).total_seconds() < self.cfg.count_period_s):
            return
        self._last_count = now
        t0 = time.perf_counter()
        self._count(image, now, tracks)
        self.count_ms += (time.perf_counter() - t0) * 1e3
        self.counts += 1

    def _switch(self, session: str | None) -> None:
        _LOGGER.info("classroom events: session %s -> %s", self._session, session)
        self._session = session
        self.occupancy.reset()
        self.attention.reset()
        self._occ_gate.reset()
        self._att_gate.reset()
        self._sent_occupancy = self._sent_share = None

    def _count(self, image: np.ndarray, now: datetime, tracks: Sequence[Track]) -> None:
        cfg = self.cfg
        if self.counter is not None:
            faces = self.counter.detect(image)
            face_boxes = [f.box for f in faces]
            keypoints = [f.keypoints for f in faces]
            count = count_people(face_boxes, [t.box for t in tracks])
        else:
            seen = [t for t in tracks if t.matched]
            face_boxes = [t.box for t in seen]
            keypoints = [t.detection.keypoints for t in seen]
            count = Count(len(seen), len(tracks) - len(seen))
        front = facing_front(keypoints, cfg.attention_max_yaw_deg, cfg.attention_max_pitch_deg)
        students = self._students(face_boxes, front, tracks) if cfg.attention_per_student else None
        self.occupancy.add(now, count)
        self.attention.add(now, front, students)
        if self._session is None:
            return  # counted (status), but events belong to a class session
        self._send_occupancy(now)
        self._send_attention(now)

    @staticmethod
    def _students(face_boxes: list[Any], front: list[bool],
                  tracks: Sequence[Track]) -> dict[str, bool]:
        from appliance.tracking import iou_matrix

        named = [(t, s) for t in tracks if t.matched and (s := _student_of(t)) is not None]
        if not named or not face_boxes:
            return {}
        iou = iou_matrix(np.asarray([t.box for t, _ in named], np.float32),
                         np.asarray(face_boxes, np.float32))
        out = {}
        for i, (_, student) in enumerate(named):
            j = int(iou[i].argmax())
            if iou[i, j] >= 0.3:
                out[student] = front[j]
        return out

    # -- events ------------------------------------------------------------------------------
    def _event(self, kind: str, severity: str, message: str, now: datetime,
               data: dict[str, Any]) -> Event:
        return Event(device_id=self.settings.device.device_id,
                     room_id=self.settings.device.room_id, kind=kind,  # type: ignore[arg-type]
                     severity=severity, message=message, at=now,  # type: ignore[arg-type]
                     session_id=self._session, data=data)

    def _write(self, event: Event) -> None:
        try:
            self.store.add_event(event)
        except Exception:  # events must never stop recognition
            _LOGGER.exception("could not store the %s event", event.kind)
            return
        metrics.CLASSROOM_EVENTS.labels(kind=event.kind).inc()
        if event.kind == "unknown_face":
            metrics.ALERTS_RAISED.labels(kind=event.kind).inc()

    def _send_occupancy(self, now: datetime) -> None:
        payload = self.occupancy.payload()
        if payload is None:
            return
        if not self._occ_gate.due(now, payload.count != self._sent_occupancy):
            return
        cap = f" of {payload.capacity}" if payload.capacity else ""
        self._write(self._event("occupancy", "info", f"{payload.count}{cap} people", now,
                                payload.model_dump(mode="json")))
        self._occ_gate.sent(now)
        self._sent_occupancy = payload.count

    def _send_attention(self, now: datetime) -> None:
        payload = self.attention.payload(self.cfg.attention_per_student)
        if payload is None:
            return
        share, sent = payload.share, self._sent_share
        changed = (share is None) != (sent is None) or (
            share is not None and sent is not None
            and abs(share - sent) >= self.cfg.attention_change)
        if not self._att_gate.due(now, changed):
            return
        text = "no face" if share is None else f"{share:.0%} facing the front"
        self._write(self._event("attention", "info", text, now, payload.model_dump(mode="json")))
        self._att_gate.sent(now)
        self._sent_share = share

    def _unknown(self, now: datetime, tracks: Sequence[Track]) -> None:
        for track in tracks:
            if _is_unknown(track):
                self.unknown.note(now, track.track_id)
        due = self.unknown.check(now)
        if due is None:
            return
        severity, ids = due
        n = len(ids)
        message = (f"{n} unknown faces during the class" if severity == "critical"
                   else "an unknown face during the class")
        event = alert_event(self.settings, "unknown_face", severity, message, now,
                            {"unknown_faces": n, "window_s": self.cfg.unknown_window_s},
                            course_id=self._session.split("@")[0] if self._session else None)
        self._write(event)
        self.unknown.alerted(now, severity)
        _LOGGER.warning("alert unknown_face (%s): %s", severity, message)

    def status(self) -> dict[str, Any]:
        occ = self.occupancy.payload()
        share = self.attention.share()
        return {"session": self._session, "occupancy": None if occ is None else occ.count,
                "attention_share": None if share is None else round(share, 3),
                "counts": self.counts,
                "count_ms_mean": round(self.count_ms / self.counts, 2) if self.counts else 0.0}
