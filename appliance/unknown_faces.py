"""Unknown-face reporting (off by default): the crop and descriptor of each track the device
could not recognise go to the aggregator (``POST /api/v1/unknown-faces``), where an admin can
enrol them as a student at the door (walk-in enrolment) in the console.

Privacy by construction: crops live only in a bounded in-memory queue; when the queue is full
or the aggregator cannot be reached the face is dropped (counted), never written to disk. If
the aggregator answers 403 (its ``unknown_faces_enabled`` is off) the reporter stops sending.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import uuid
from datetime import datetime

import cv2
import httpx
import numpy as np

from appliance.config import ApplianceSettings
from cloud_sync.protocol import EMBEDDER_IDS

_LOGGER = logging.getLogger(__name__)
PATH = "/api/v1/unknown-faces"


def encode_crop(crop_bgr: np.ndarray, max_px: int) -> str:
    """Base64 JPEG of ``crop_bgr`` with its longest side at most ``max_px``."""
    scale = max_px / max(crop_bgr.shape[:2])
    if scale < 1.0:
        crop_bgr = cv2.resize(crop_bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", crop_bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("crop not encodable as JPEG")
    return base64.b64encode(data.tobytes()).decode()


class UnknownFaceReporter:
    """``offer()`` is the pipeline's ``unknown_sink`` (never blocks); a thread sends."""

    def __init__(self, settings: ApplianceSettings,
                 client: httpx.Client | None = None) -> None:
        self.settings = settings
        cfg = settings.unknown_faces
        key = settings.sync.api_key.get_secret_value() if settings.sync.api_key else ""
        self._client = client or httpx.Client(
            base_url=(settings.sync.aggregator_url or "").rstrip("/"),
            headers={"Authorization": f"Bearer {key}"}, timeout=settings.sync.request_timeout_s)
        self._queue: queue.Queue[dict[str, object] | None] = queue.Queue(cfg.queue_size)
        self._thread = threading.Thread(target=self._run, name="unknown-faces", daemon=True)
        self.sent = 0
        self.dropped = 0
        self.refused = False

    def offer(self, crop_bgr: np.ndarray, descriptor: np.ndarray, at: datetime) -> None:
        if self.refused or crop_bgr.size == 0:
            return
        vector = np.asarray(descriptor, np.float64).reshape(-1)
        if not np.all(np.isfinite(vector)):
            return
        body = {"v": 1, "key": str(uuid.uuid4()), "device_id": self.settings.device.device_id,
                "room_id": self.settings.device.room_id, "at": at.isoformat(),
                "descriptor": [float(v) for v in vector],
                "embedder": EMBEDDER_IDS[self.settings.recognition.embedder],
                "crop_jpeg": encode_crop(crop_bgr, self.settings.unknown_faces.crop_px)}
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            self.dropped += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            self.refused = True  # the thread ends after its current item
        if self._thread.is_alive():  # not started when the device stopped during start-up
            self._thread.join(timeout=self.settings.sync.request_timeout_s + 5)
        self._client.close()

    def _run(self) -> None:
        while not self.refused:
            body = self._queue.get()
            if body is None:
                return
            try:
                response = self._client.post(PATH, json=body)
            except httpx.HTTPError as err:
                self.dropped += 1
                _LOGGER.debug("unknown face not sent (%s): dropped", err)
                continue
            if response.status_code == 403:
                self.refused = True
                _LOGGER.warning("the aggregator refuses unknown faces (%s): reporting stopped",
                                response.text[:200])
            elif response.status_code >= 300:
                self.dropped += 1
                _LOGGER.info("unknown face refused: HTTP %d %s", response.status_code,
                             response.text[:200])
            else:
                self.sent += 1
