"""Server-side enrollment: a photo -> exactly-one-face 128-d embeddings, with the device's code.

The detection, quality checks and embedding are the appliance's own
(``appliance.vision.enroll.embed_photo`` with ``FaceDetector`` and the embedders of
``appliance.vision.embedding``), so an embedding made here matches what the device computes at
the door. One descriptor per configured embedder (``settings.embedders``) is kept for every
photo, so devices of either embedder get a roster and a fleet can switch without new photos.
The photo is written under ``data_dir/photos`` only when ``settings.keep_photos`` is true (it
lets `aggregator faces reencode` add the descriptors of an embedder configured later).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from appliance.vision import decode
from appliance.vision.enroll import IMAGE_SUFFIXES
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import FaceEmbedding, Student
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services.common import (
    NotFoundError,
    ServiceError,
    UnavailableError,
    utcnow,
)
from cloud_sync.aggregator.services.privacy import require_consent
from cloud_sync.protocol import EMBEDDING_DIM, LEGACY_EMBEDDER

_LOGGER = logging.getLogger(__name__)
MAX_PIXELS = decode.MAX_PIXELS


@dataclass(frozen=True)
class Encoded:
    """The outcome of one photo: an embedding (and quality) or the reason there is none.
    ``embedding`` is the first configured embedder's; ``vectors`` holds every configured
    embedder's, by ``name/model_version``."""

    embedding: np.ndarray | None
    quality: float | None
    reason: str | None
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


def decode_image(data: bytes, max_side: int | None = None) -> np.ndarray:
    """BGR pixels of an uploaded image, or ServiceError (not a JPEG, PNG, WebP or BMP; larger
    than MAX_PIXELS or ``max_side``): the header is checked before anything is decoded
    (appliance.vision.decode), so a small file declaring a huge image allocates nothing."""
    if not data:
        raise ServiceError("empty photo")
    try:
        return decode.decode_image(data, max_pixels=MAX_PIXELS, max_side=max_side)
    except decode.ImageRejectedError as err:
        raise ServiceError(str(err)) from err


class FaceEncoder:
    """Loads the device's detector and the configured embedders once; thread-safe (one photo
    at a time)."""

    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._parts: tuple[Any, Any, list[Any]] | None = None

    def _load(self) -> tuple[Any, Any, list[Any]]:
        if self._parts is not None:
            return self._parts
        try:
            from appliance.vision import enroll
            from appliance.vision.embedding import create_embedder
        except ImportError as err:
            raise UnavailableError(f"server-side enrollment unavailable: {err}") from err
        from models import DEFAULT_MODEL_DIR, ModelError

        model_dir = self.settings.model_dir or DEFAULT_MODEL_DIR
        model = self.settings.detector_model
        try:
            # Exactly what `appliance roster build` uses on the device side.
            detector = enroll.enrollment_detector(model_dir, model)
            embedders = [create_embedder(name, model_dir, detector_model=model)
                         for name in dict.fromkeys(self.settings.embedders)]
        except (ModelError, OSError, RuntimeError, ValueError) as err:
            raise UnavailableError(f"face models not loadable from {model_dir}: {err}") from err
        self._parts = (enroll, detector, embedders)
        return self._parts

    def encode(self, image_bgr: np.ndarray, only: set[str] | None = None) -> Encoded:
        """Every configured embedder's descriptor of the photo's one face (or those whose
        ``name/model_version`` is in ``only``), or the reason there is none."""
        with self._lock:
            enroll, detector, embedders = self._load()
            wanted = [e for e in embedders
                      if only is None or f"{e.name}/{e.model_version}" in only]
            image, found = enroll.one_face(image_bgr, detector, self.settings.enroll_min_face_px)
            if found.reason is not None or found.detection is None:
                return Encoded(None, found.quality, found.reason or "no usable face")
            vectors: dict[str, np.ndarray] = {}
            for embedder in wanted:
                raw = embedder.embed(image, [found.detection],
                                     num_jitters=enroll.ENROLL_JITTERS)[0]
                vector = np.asarray(raw, dtype=np.float32).reshape(-1)
                if vector.shape != (EMBEDDING_DIM,) or not np.all(np.isfinite(vector)):
                    return Encoded(None, found.quality, "embedder returned an invalid vector")
                vectors[f"{embedder.name}/{embedder.model_version}"] = vector
        if not vectors:
            return Encoded(None, found.quality, "no embedder selected")
        quality = float(found.quality)
        return Encoded(next(iter(vectors.values())), quality, None, vectors)



    def encode_video(self, path: Path) -> list[Encoded]:
        """The best, most varied frames of an enrolment video, each with every configured
        embedder's descriptor (frames chosen by the first embedder's descriptors)."""
        with self._lock:
            enroll, detector, embedders = self._load()
            try:
                frames = enroll.select_video_frames(
                    path, detector, embedders[0], self.settings.enroll_min_face_px)
            except ValueError as err:
                raise ServiceError(str(err)) from err
            out = []
            for frame in frames:
                vectors = {f"{embedders[0].name}/{embedders[0].model_version}": frame.embedding}
                for embedder in embedders[1:]:
                    vectors[f"{embedder.name}/{embedder.model_version}"] = np.asarray(
                        embedder.embed(frame.image, [frame.detection],
                                       num_jitters=enroll.ENROLL_JITTERS)[0], np.float32)
                out.append(Encoded(frame.embedding, float(frame.quality), None, vectors))
        return out



def store_embedding(
    session: Session, settings: AggregatorSettings, student_id: str,
    vector: np.ndarray | Mapping[str, np.ndarray],
    quality: float | None, source: str, photo: bytes | None = None, suffix: str = ".jpg",
) -> FaceEmbedding:
    """Keep one photo's embeddings (``vector``: one per ``name/model_version``, or a single
    dlib vector as before embedders were recorded) and the photo only if ``keep_photos``.
    Returns the row that stands for the photo. ConflictError unless the student's consent is
    granted. Commits."""
    begin_write(session)
    require_consent(session, student_id)  # also: NotFoundError for an unknown student
    vectors = dict(vector) if isinstance(vector, Mapping) else {LEGACY_EMBEDDER: vector}
    now = utcnow()
    rows = [
        FaceEmbedding(
            student_id=student_id, vector=np.asarray(v, dtype="<f4").tobytes(),
            embedder=embedder, source=source[:200], quality=quality, created_at=now,
        )
        for embedder, v in vectors.items()
    ]
    row = rows[0]
    session.add(row)
    session.flush()
    for other in rows[1:]:
        other.photo_of = row.id
        session.add(other)
    session.flush()
    if settings.keep_photos and photo is not None:
        directory = Path(settings.data_dir) / "photos" / student_id
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{row.id}{suffix if suffix in IMAGE_SUFFIXES else '.jpg'}"
        path.write_bytes(photo)
        row.photo_path = str(path)
    session.commit()
    return row


def list_faces(session: Session, student_id: str) -> list[FaceEmbedding]:
    if session.get(Student, student_id) is None:
        raise NotFoundError(f"student {student_id!r} does not exist")
    return list(session.scalars(
        select(FaceEmbedding).where(FaceEmbedding.student_id == student_id,
                                    FaceEmbedding.photo_of.is_(None))
        .order_by(FaceEmbedding.id)
    ))


def embedders_of(session: Session, face_ids: list[int]) -> dict[int, list[str]]:
    """Photo row id -> the embedders that have a descriptor of that photo."""
    out: dict[int, list[str]] = {i: [] for i in face_ids}
    if not face_ids:
        return out
    rows = session.execute(
        select(FaceEmbedding.id, FaceEmbedding.photo_of, FaceEmbedding.embedder)
        .where((FaceEmbedding.id.in_(face_ids)) | (FaceEmbedding.photo_of.in_(face_ids)))
        .order_by(FaceEmbedding.id)
    ).all()
    for row_id, photo_of, embedder in rows:
        out[photo_of if photo_of is not None else row_id].append(embedder)
    return out


def delete_face(session: Session, student_id: str, face_id: int) -> None:
    begin_write(session)
    row = session.get(FaceEmbedding, face_id)
    if row is None or row.student_id != student_id or row.photo_of is not None:
        raise NotFoundError(f"face {face_id} of student {student_id!r} does not exist")
    if row.photo_path:
        Path(row.photo_path).unlink(missing_ok=True)
    session.execute(delete(FaceEmbedding).where(FaceEmbedding.photo_of == row.id))
    session.delete(row)
    session.commit()


@dataclass
class ReencodeReport:
    """What `aggregator faces reencode` did."""

    added: int = 0  # descriptors computed from kept photos
    failed: list[str] = field(default_factory=list)  # "photo: reason"
    # students lacking a configured embedder's descriptor with no kept photo to compute it from
    need_photos: dict[str, list[str]] = field(default_factory=dict)


def reencode(session: Session, encoder: FaceEncoder, wanted: list[str]) -> ReencodeReport:
    """Add the missing descriptors of every embedder in ``wanted`` (``name/model_version``)
    to every enrolled photo that was kept; list the students who still have none of an
    embedder's descriptors (their photos were not kept: they must be enrolled again)."""
    report = ReencodeReport()
    photos = list(session.scalars(
        select(FaceEmbedding).where(FaceEmbedding.photo_of.is_(None))
        .order_by(FaceEmbedding.id)))
    have = embedders_of(session, [p.id for p in photos])
    session.rollback()
    for photo in photos:
        missing = set(wanted) - set(have[photo.id])
        if not missing or not photo.photo_path:
            continue
        try:
            encoded = encoder.encode(decode_image(Path(photo.photo_path).read_bytes()), missing)
        except (OSError, ServiceError) as err:
            report.failed.append(f"{photo.photo_path}: {err}")
            continue
        if not encoded.vectors:
            report.failed.append(f"{photo.photo_path}: {encoded.reason}")
            continue
        begin_write(session)
        for embedder, vector in encoded.vectors.items():
            session.add(FaceEmbedding(
                student_id=photo.student_id, vector=np.asarray(vector, "<f4").tobytes(),
                embedder=embedder, photo_of=photo.id, source=photo.source,
                quality=photo.quality, created_at=utcnow()))
            report.added += 1
        session.commit()
    students = session.execute(
        select(FaceEmbedding.student_id, FaceEmbedding.embedder).distinct()).all()
    by_student: dict[str, set[str]] = {}
    for student_id, embedder in students:
        by_student.setdefault(student_id, set()).add(embedder)
    for student_id, embedders in sorted(by_student.items()):
        lacking = sorted(set(wanted) - embedders)
        if lacking:
            report.need_photos[student_id] = lacking
    session.rollback()
    return report
