"""Which face detector: ``detector.model`` -> a loaded detector.

- ``yunet`` (default): YuNet on ``cv2.FaceDetectorYN`` (:mod:`appliance.vision.yunet`); finds
  faces from ~10 px at any input size, on OpenCV alone.
- ``full_range`` / ``short_range``: MediaPipe BlazeFace (:mod:`appliance.vision.detector`) on
  the LiteRT interpreter (``ai_edge_litert`` or ``tflite_runtime``, an optional dependency:
  it has no wheel for some platforms, e.g. Python 3.13 on aarch64).

Every detector has ``detect(frame_bgr) -> list[Detection]`` (frame pixels, highest score first),
``model`` and ``min_face_px``. The choice and its measurements: docs/RECOGNITION.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from appliance.vision.detector import Detection

if TYPE_CHECKING:
    from appliance.config import DetectorConfig

DetectorModel = Literal["yunet", "full_range", "short_range"]
DETECTOR_MODELS: tuple[DetectorModel, ...] = ("yunet", "full_range", "short_range")
DEFAULT_DETECTOR: DetectorModel = "yunet"


class Detector(Protocol):
    model: str
    min_face_px: int

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]: ...


def create_detector(
    model_dir: Path,
    model: str = DEFAULT_DETECTOR,
    *,
    score_threshold: float = 0.6,
    nms_iou: float = 0.3,
    min_face_px: int = 24,
    tiles: int = 1,
    threads: int = 1,
    input_width: int = 0,
) -> Detector:
    """Load the named detector (its model file size + sha256 checked).

    ``tiles`` applies to BlazeFace (YuNet needs none: it runs at the frame's own size),
    ``input_width`` to YuNet (frames wider than this are downscaled for detection; 0: never).
    """
    if model == "yunet":
        from appliance.vision.yunet import YuNetDetector

        return YuNetDetector(model_dir, score_threshold=score_threshold, nms_iou=nms_iou,
                             min_face_px=min_face_px, input_width=input_width, threads=threads)
    from appliance.vision.detector import FaceDetector

    return FaceDetector(model_dir, model=model, score_threshold=score_threshold,
                        nms_iou=nms_iou, min_face_px=min_face_px, tiles=tiles, threads=threads)


def detector_from_config(cfg: DetectorConfig, model_dir: Path) -> Detector:
    """The detector the ``detector`` settings describe."""
    return create_detector(model_dir, cfg.model, score_threshold=cfg.score_threshold,
                           nms_iou=cfg.nms_iou, min_face_px=cfg.min_face_px, tiles=cfg.tiles,
                           threads=cfg.threads, input_width=cfg.input_width)
