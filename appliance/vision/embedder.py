"""dlib 128-d face descriptors, aligned with dlib's 5-point shape predictor.

This is exactly the computation of ``face_recognition.face_encodings(rgb, [box], model="small")``:
``dlib.shape_predictor`` (5 points) on a ``dlib.rectangle``, then
``dlib.face_recognition_model_v1.compute_face_descriptor(rgb, shape, num_jitters)``, which warps
the face to a 150x150 chip and runs dlib's ResNet. It calls dlib directly instead of importing
``face_recognition`` because:

- importing ``face_recognition`` loads, at import time, its 68-point landmark predictor and its CNN
  face detector (over 100 MB of RSS) that the device never uses, and
- its model files come from the ``face_recognition_models`` package without any checksum; here
  both model files come from ``models.model_path`` (``models/manifest.toml``: size + sha256).

tests/vision/test_embedder.py proves the equivalence on real photos (max abs diff ~1e-6).

Box conversion. The 5-point predictor was trained on boxes from dlib's HOG face detector. A
BlazeFace box has a different size and offset, so :data:`BOX_CALIBRATION` maps it to the box the
HOG detector would give: ``centre + (dx, dy) * width`` and a square side of ``scale * width``.
The constants are medians over faces both detectors found in photos of people who are NOT in the
recognition benchmark (the LFW tuning people, faceapi_bbt, deepface, knn_examples);
``python -m bench.calibrate_boxes`` recomputes them (see docs/RECOGNITION.md). The predictor is
robust to the remaining difference: its landmarks move by <1 % of the eye distance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import dlib
import numpy as np

from appliance.vision.detector import Detection
from models import model_path

_LOGGER = logging.getLogger(__name__)

EMBEDDING_DIM = 128
CROP_MARGIN = 1.0  # context kept around a box (in box widths) for alignment + chip extraction


@dataclass(frozen=True, slots=True)
class BoxCalibration:
    """BlazeFace box -> dlib HOG-style box: square of side ``scale * w`` centred at
    ``(cx + dx * w, cy + dy * w)`` where ``w`` is the BlazeFace box width."""

    dx: float
    dy: float
    scale: float


# Derived by bench/calibrate_boxes.py (medians over 704 / 729 face pairs, tuning data only).
BOX_CALIBRATION: dict[str, BoxCalibration] = {
    "full_range": BoxCalibration(dx=0.005, dy=0.008, scale=0.923),
    "short_range": BoxCalibration(dx=-0.004, dy=-0.039, scale=0.964),
}
IDENTITY = BoxCalibration(0.0, 0.0, 1.0)


def hog_box(box: Sequence[float], calibration: BoxCalibration) -> tuple[float, float, float, float]:
    """The dlib-HOG-style box (x1, y1, x2, y2) for a BlazeFace box."""
    x1, y1, x2, y2 = box
    w = x2 - x1
    cx = (x1 + x2) / 2.0 + calibration.dx * w
    cy = (y1 + y2) / 2.0 + calibration.dy * w
    half = calibration.scale * w / 2.0
    return (cx - half, cy - half, cx + half, cy + half)


class FaceEmbedder:
    """128-d dlib descriptors for detections in a BGR frame (the ``dlib`` embedder)."""

    name = "dlib"
    model_version = "dlib-resnet-v1"
    metric = "euclidean"

    def __init__(
        self,
        model_dir: Path,
        *,
        detector_model: str = "yunet",
        num_jitters: int = 1,
        flip_average: bool = False,
    ) -> None:
        self.calibration = BOX_CALIBRATION.get(detector_model, IDENTITY)
        self.num_jitters = num_jitters
        self.flip_average = flip_average
        self._predictor = dlib.shape_predictor(
            str(model_path("dlib_shape_predictor_5", model_dir))
        )
        self._encoder = dlib.face_recognition_model_v1(
            str(model_path("dlib_face_recognition_resnet", model_dir))
        )
        _LOGGER.info("dlib embedder loaded (boxes calibrated for %s)", detector_model)

    def embed(
        self,
        frame_bgr: np.ndarray,
        detections: Sequence[Detection],
        *,
        num_jitters: int | None = None,
        flip_average: bool | None = None,
    ) -> np.ndarray:
        """One descriptor per detection, shape ``(n, 128)`` float32.

        ``flip_average`` (default: the constructor's): average the descriptor with the one of the
        mirrored face. Twice the cost; +1.3 points of identification on the tuning people.
        """
        boxes = [hog_box(d.box, self.calibration) for d in detections]
        return self.embed_boxes(
            frame_bgr, boxes, num_jitters=num_jitters, flip_average=flip_average
        )

    def embed_boxes(
        self,
        frame_bgr: np.ndarray,
        boxes: Sequence[Sequence[float]],
        *,
        num_jitters: int | None = None,
        flip_average: bool | None = None,
    ) -> np.ndarray:
        """Descriptors for dlib-style boxes ``(x1, y1, x2, y2)`` (no calibration applied).

        Only a crop around each face is converted to RGB; dlib sees the crop with the box shifted
        accordingly, which gives the same landmarks and chip as the whole frame would.
        """
        jitters = self.num_jitters if num_jitters is None else num_jitters
        flip = self.flip_average if flip_average is None else flip_average
        out = np.zeros((len(boxes), EMBEDDING_DIM), np.float32)
        h, w = frame_bgr.shape[:2]
        for i, box in enumerate(boxes):
            left, top = round(box[0]), round(box[1])
            right, bottom = round(box[2]), round(box[3])
            margin = round(CROP_MARGIN * max(right - left, bottom - top))
            cx1, cy1 = max(0, left - margin), max(0, top - margin)
            cx2, cy2 = min(w, right + margin), min(h, bottom + margin)
            crop = np.ascontiguousarray(
                cv2.cvtColor(frame_bgr[cy1:cy2, cx1:cx2], cv2.COLOR_BGR2RGB)
            )
            rect = dlib.rectangle(left - cx1, top - cy1, right - cx1, bottom - cy1)
            out[i] = self._descriptor(crop, rect, jitters)
            if flip:
                mirrored = np.ascontiguousarray(crop[:, ::-1])
                cw = crop.shape[1]
                rect = dlib.rectangle(cw - 1 - (right - cx1), top - cy1,
                                      cw - 1 - (left - cx1), bottom - cy1)
                out[i] = (out[i] + self._descriptor(mirrored, rect, jitters)) / 2.0
        return out

    def _descriptor(self, rgb: np.ndarray, rect: dlib.rectangle, jitters: int) -> np.ndarray:
        shape = self._predictor(rgb, rect)
        return np.asarray(self._encoder.compute_face_descriptor(rgb, shape, jitters))

    def landmarks(self, frame_bgr: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """The 5 dlib landmarks ``(5, 2)`` for a dlib-style box (diagnostics, calibration)."""
        rgb = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)
        rect = dlib.rectangle(*(round(v) for v in box))
        shape = self._predictor(rgb, rect)
        return np.array([[shape.part(k).x, shape.part(k).y] for k in range(5)], np.float32)
