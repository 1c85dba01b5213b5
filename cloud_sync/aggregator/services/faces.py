"""Server-side enrollment: a photo -> exactly-one-face 128-d embedding, with the device's code.

The detection, quality checks and embedding are the appliance's own
(``appliance.vision.enroll.embed_photo`` with ``FaceDetector`` and ``FaceEmbedder``), so an
embedding made here matches what the device computes at the door. Only the embedding is kept;
the photo is written under ``data_dir/photos`` only when ``settings.keep_photos`` is true.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import FaceEmbedding, Student
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services.common import (
    NotFoundError,
    ServiceError,
    UnavailableError,
    utcnow,
)
from cloud_sync.protocol import EMBEDDING_DIM

_LOGGER = logging.getLogger(__name__)
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".pgm", ".ppm", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class Encoded:
    """The outcome of one photo: an embedding (and quality) or the reason there is none."""

    embedding: np.ndarray | None
    quality: float | None
    reason: str | None


def decode_image(data: bytes) -> np.ndarray:
    """BGR pixels of an encoded image, or ServiceError (not an image / too large)."""
    if not data:
        raise ServiceError("empty photo")
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ServiceError("not a decodable image (JPEG, PNG, WebP, BMP ...)")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ServiceError(f"image larger than {MAX_PIXELS} pixels")
    return image


class FaceEncoder:
    """Loads the device's detector and embedder once; thread-safe (one photo at a time)."""

    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._parts: tuple[Any, Any, Any] | None = None

    def _load(self) -> tuple[Any, Any, Any]:
        if self._parts is not None:
            return self._parts
        try:
            from appliance.vision import enroll
            from appliance.vision.embedder import FaceEmbedder
        except ImportError as err:
            raise UnavailableError(f"server-side enrollment unavailable: {err}") from err
        from models import DEFAULT_MODEL_DIR, ModelError

        model_dir = self.settings.model_dir or DEFAULT_MODEL_DIR
        model = self.settings.detector_model
        try:
            # Exactly what `appliance roster build` uses on the device side.
            detector = enroll.enrollment_detector(model_dir, model)
            embedder = FaceEmbedder(model_dir, detector_model=model)
        except (ModelError, OSError, RuntimeError, ValueError) as err:
            raise UnavailableError(f"face models not loadable from {model_dir}: {err}") from err
        self._parts = (enroll, detector, embedder)
        return self._parts

    def encode(self, image_bgr: np.ndarray) -> Encoded:
        with self._lock:
            enroll, detector, embedder = self._load()
            result = enroll.embed_photo(
                image_bgr, detector, embedder, self.settings.enroll_min_face_px
            )
        embedding = getattr(result, "embedding", None)
        reason = getattr(result, "reason", None)
        quality = getattr(result, "quality", None)
        if embedding is None:
            return Encoded(None, quality, reason or "no usable face")
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if vector.shape != (EMBEDDING_DIM,) or not np.all(np.isfinite(vector)):
            return Encoded(None, quality, "embedder returned an invalid vector")
        return Encoded(vector, None if quality is None else float(quality), None)



def store_embedding(
    session: Session, settings: AggregatorSettings, student_id: str, vector: np.ndarray,
    quality: float | None, source: str, photo: bytes | None = None, suffix: str = ".jpg",
) -> FaceEmbedding:
    """Keep one embedding (and the photo only if ``keep_photos``). Commits."""
    begin_write(session)
    if session.get(Student, student_id) is None:
        raise NotFoundError(f"student {student_id!r} does not exist")
    row = FaceEmbedding(
        student_id=student_id, vector=np.asarray(vector, dtype="<f4").tobytes(),
        source=source[:200], quality=quality, created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    if settings.keep_photos and photo is not None:
        directory = Path(settings.data_dir) / "photos" / student_id
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{row.id}{suffix if suffix in PHOTO_SUFFIXES else '.jpg'}"
        path.write_bytes(photo)
        row.photo_path = str(path)
    session.commit()
    return row


def list_faces(session: Session, student_id: str) -> list[FaceEmbedding]:
    if session.get(Student, student_id) is None:
        raise NotFoundError(f"student {student_id!r} does not exist")
    return list(session.scalars(
        select(FaceEmbedding).where(FaceEmbedding.student_id == student_id)
        .order_by(FaceEmbedding.id)
    ))


def delete_face(session: Session, student_id: str, face_id: int) -> None:
    begin_write(session)
    row = session.get(FaceEmbedding, face_id)
    if row is None or row.student_id != student_id:
        raise NotFoundError(f"face {face_id} of student {student_id!r} does not exist")
    if row.photo_path:
        Path(row.photo_path).unlink(missing_ok=True)
    session.delete(row)
    session.commit()
