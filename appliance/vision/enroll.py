"""Enrollment: one photo in, exactly one face descriptor out, or the reason it was rejected;
or a short enrolment video in, the best and most varied frames' descriptors out.

Shared by ``appliance roster build`` and the aggregator's server-side enrollment, so it depends
only on the vision modules, the config and the models (no appliance runtime).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from appliance.vision import decode
from appliance.vision.detector import Detection
from appliance.vision.detectors import DEFAULT_DETECTOR, Detector, create_detector
from appliance.vision.embedding import Embedder
from appliance.vision.quality import chip_sharpness, face_quality

_LOGGER = logging.getLogger(__name__)

ENROLL_JITTERS = 5  # re-sampled descriptors averaged for roster photos (enrolment only)
# A roster photo's face must be this wide, and smaller faces beside it (people in the
# background) are not counted as a second face; the door detector's floor is lower
# (detector.min_face_px), a roster photo is a close-up.
ENROLL_MIN_FACE_PX = 40
# Laplacian variance of the aligned 112 px chip the embedder sees (quality.chip_sharpness): LFW
# photos median ~143, 10th percentile ~66; a Gaussian blur of sigma 3 gives ~4
MIN_SHARPNESS = 15.0
MAX_SIDE_PX = 1600  # larger photos are downscaled first (faces stay far above the minimum)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".pgm", ".ppm", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi")
MEDIA_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES
RECOMMENDED_PHOTOS = (3, 5)  # per student (docs/RECOGNITION.md: the effect of 1, 2, 3, 5)
VIDEO_FRAMES = 5  # descriptors taken from one enrolment video
VIDEO_CANDIDATES = 12  # sharpest, most frontal frames considered for them
VIDEO_MAX_SAMPLED = 60  # frames looked at, spread over the clip
VIDEO_MAX_SECONDS = 20.0
VIDEO_MAX_PIXELS = 3840 * 2160  # frames of an enrolment video: a phone's 4K at most


@dataclass(frozen=True)
class EnrollResult:
    """``embedding`` (128,) when exactly one usable face was found, else ``reason``."""

    embedding: np.ndarray | None
    reason: str | None
    detection: Detection | None = None
    quality: float = 0.0

    @property
    def ok(self) -> bool:
        return self.embedding is not None


def load_image(path: Path) -> np.ndarray:
    """A photo as BGR uint8 (EXIF orientation applied; JPEG, PNG, WebP, BMP, PPM/PGM or TIFF,
    by content; its header is checked before decoding: appliance.vision.decode)."""
    try:
        return decode.decode_image(Path(path).read_bytes(), formats=decode.LOCAL_FORMATS)
    except decode.ImageRejectedError as err:
        raise ValueError(f"{path}: {err}") from err


def decode_image(data: bytes) -> np.ndarray:
    """Uploaded image bytes as BGR uint8 (JPEG, PNG, WebP or BMP; the header is checked
    before decoding: appliance.vision.decode)."""
    return decode.decode_image(data)


STILL_PAD = 0.5  # grey border (in longest sides) added when a still photo shows no face


def detect_still(image_bgr: np.ndarray, detector: Detector) -> list[Detection]:
    """Faces in a still photo, in its pixel coordinates.

    A tight face crop (the face filling the photo, e.g. a 150x150 ID crop) is outside what the
    BlazeFace models were trained on: the full-range model finds 9 of the 40 faceapi_bbt crops.
    When nothing is found, the photo is detected again with a grey border of ``STILL_PAD`` times
    its longest side on every side (40 of 40), and the boxes are mapped back (they may then
    extend slightly past the photo's edges; dlib handles that).
    """
    detections = detector.detect(image_bgr)
    if detections:
        return detections
    border = round(STILL_PAD * max(image_bgr.shape[:2]))
    padded = cv2.copyMakeBorder(
        image_bgr, border, border, border, border, cv2.BORDER_CONSTANT, value=(127, 127, 127)
    )
    return [
        Detection(
            (d.box[0] - border, d.box[1] - border, d.box[2] - border, d.box[3] - border),
            d.score,
            (d.keypoints - border).astype(np.float32),
        )
        for d in detector.detect(padded)
    ]


def one_face(
    image_bgr: np.ndarray,
    detector: Detector,
    min_face_px: int = ENROLL_MIN_FACE_PX,
    *,
    min_sharpness: float = MIN_SHARPNESS,
) -> tuple[np.ndarray, EnrollResult]:
    """The (possibly downscaled) image and its one usable face (``embedding`` still None), or
    the reason there is none: "no face", "2 faces", "face too small (N px)", "blurred"."""
    scale = 1.0
    if max(image_bgr.shape[:2]) > MAX_SIDE_PX:
        scale = MAX_SIDE_PX / max(image_bgr.shape[:2])
        image_bgr = cv2.resize(image_bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    detections = detect_still(image_bgr, detector)
    if not detections:
        return image_bgr, EnrollResult(None, "no face")
    big = [d for d in detections if d.width / scale >= min_face_px]
    if not big:
        largest = max(detections, key=lambda d: d.width)
        return image_bgr, EnrollResult(
            None, f"face too small ({round(largest.width / scale)} px)", largest)
    if len(big) > 1:
        return image_bgr, EnrollResult(None, f"{len(big)} faces")
    det = big[0]
    if chip_sharpness(image_bgr, det) < min_sharpness:
        return image_bgr, EnrollResult(None, "blurred", det)
    return image_bgr, EnrollResult(None, None, det, face_quality(image_bgr, det))


def embed_photo(
    image_bgr: np.ndarray,
    detector: Detector,
    embedder: Embedder,
    min_face_px: int = ENROLL_MIN_FACE_PX,
    *,
    num_jitters: int = ENROLL_JITTERS,
    min_sharpness: float = MIN_SHARPNESS,
) -> EnrollResult:
    """Exactly one face's descriptor, or a reason: "no face", "2 faces",
    "face too small (N px)", "blurred".

    The detector should have a low ``min_face_px`` so a small face is reported as too small
    rather than as no face; faces below ``min_face_px`` next to a big one are not counted as
    extra faces (background people).
    """
    image_bgr, found = one_face(image_bgr, detector, min_face_px, min_sharpness=min_sharpness)
    if found.detection is None or found.reason is not None:
        return found
    det = found.detection
    embedding = embedder.embed(image_bgr, [det], num_jitters=num_jitters)[0]
    return EnrollResult(embedding, None, det, found.quality)


def is_video(path: Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def video_frames(path: Path, max_frames: int = VIDEO_MAX_SAMPLED,
                 max_seconds: float = VIDEO_MAX_SECONDS) -> list[np.ndarray]:
    """Up to ``max_frames`` frames spread evenly over the first ``max_seconds`` of a video."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ValueError(f"{path}: not a video OpenCV can read")
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        if width * height > VIDEO_MAX_PIXELS:
            raise ValueError(f"{path}: frames of {width}x{height} pixels are larger than "
                             f"{VIDEO_MAX_PIXELS} pixels (4K)")
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        limit = int(min(count if count > 0 else fps * max_seconds, fps * max_seconds))
        step = max(1, limit // max_frames)
        frames: list[np.ndarray] = []
        index = 0
        while index < limit and len(frames) < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            if index % step == 0:
                frames.append(frame)
            index += 1
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"{path}: no frame could be read")
    return frames


@dataclass(frozen=True)
class VideoFrame:
    """One frame chosen from an enrolment video: the (possibly downscaled) image, its face,
    quality and the selecting embedder's descriptor."""

    image: np.ndarray
    detection: Detection
    quality: float
    embedding: np.ndarray


def select_video_frames(
    path: Path,
    detector: Detector,
    embedder: Embedder,
    min_face_px: int = ENROLL_MIN_FACE_PX,
    *,
    count: int = VIDEO_FRAMES,
    num_jitters: int = ENROLL_JITTERS,
) -> list[VideoFrame]:
    """The best, most varied frames of a short enrolment video.

    Frames spread over the clip are checked like photos (exactly one face, big and sharp
    enough); the ``VIDEO_CANDIDATES`` of highest face quality get a descriptor, and ``count``
    of them are chosen greedily: first the best, then each time the frame whose descriptor is
    farthest from those already chosen (times its quality), so the roster holds different
    views of the face rather than five copies of one."""
    candidates: list[tuple[float, np.ndarray, Detection]] = []
    for frame in video_frames(path):
        image, found = one_face(frame, detector, min_face_px)
        if found.reason is None and found.detection is not None:
            candidates.append((found.quality, image, found.detection))
    candidates.sort(key=lambda c: c[0], reverse=True)
    candidates = candidates[:VIDEO_CANDIDATES]
    if not candidates:
        return []
    vectors = np.stack([embedder.embed(img, [det], num_jitters=num_jitters)[0]
                        for _, img, det in candidates]).astype(np.float64)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    chosen = [0]
    while len(chosen) < min(count, len(candidates)):
        spread = 1.0 - (unit @ unit[chosen].T).max(axis=1)
        score = spread * np.array([c[0] for c in candidates])
        score[chosen] = -1.0
        chosen.append(int(np.argmax(score)))
    return [VideoFrame(candidates[i][1], candidates[i][2], candidates[i][0],
                       vectors[i].astype(np.float32)) for i in chosen]


ENROLL_YUNET_WIDTH = 640  # YuNet was trained on faces up to ~300 px: close-ups are scaled down
ENROLL_YUNET_SCORE = 0.75  # YuNet scores real faces >= ~0.85; painted or partial ones lower


def enrollment_detector(model_dir: Path, model: str = DEFAULT_DETECTOR) -> Detector:
    """A detector for still photos: low size floor (sizes are checked by embed_photo).

    BlazeFace letterboxes the whole photo into its input; YuNet runs on a copy at most
    ``ENROLL_YUNET_WIDTH`` wide (a 1200 px portrait's 450 px face is outside what it was
    trained on: it then also "finds" faces in a painting behind the person) and keeps faces
    scoring ``ENROLL_YUNET_SCORE`` or more."""
    if model == "yunet":
        return create_detector(model_dir, model, score_threshold=ENROLL_YUNET_SCORE,
                               min_face_px=8, input_width=ENROLL_YUNET_WIDTH)
    return create_detector(model_dir, model, score_threshold=0.5, min_face_px=8)


def collect_photos(photos_dir: Path,
                   suffixes: tuple[str, ...] = MEDIA_SUFFIXES) -> dict[str, list[Path]]:
    """Student id -> photos: ``S001.jpg`` (one photo) and/or ``S001/*.jpg`` (several); enrolment
    videos (``S001.mp4``, ``S001/*.mp4``) are listed too (see :func:`is_video`) unless
    ``suffixes`` leaves them out (``IMAGE_SUFFIXES``: photos only).

    Hidden files and files whose suffix is not in ``suffixes`` are ignored; ids are sorted.
    `appliance roster build` and `aggregator faces encode --batch` both read a folder so.
    """
    found: dict[str, list[Path]] = {}
    for entry in sorted(Path(photos_dir).iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            photos = [
                p for p in sorted(entry.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
            ]
            if photos:
                found.setdefault(entry.name, []).extend(photos)
        elif entry.is_file() and entry.suffix.lower() in suffixes:
            found.setdefault(entry.stem, []).append(entry)
    return found


def read_names(path: Path) -> dict[str, str]:
    """``names.csv`` rows ``student_id,name`` (a header row ``student_id,...`` is skipped)."""
    import csv

    names: dict[str, str] = {}
    with Path(path).open(newline="", encoding="utf-8-sig") as fh:
        for row in csv.reader(fh):
            if len(row) < 2 or not row[0].strip() or row[0].strip().lower() == "student_id":
                continue
            names[row[0].strip()] = row[1].strip()
    return names
