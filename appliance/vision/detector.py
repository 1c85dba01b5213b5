"""BlazeFace face detection (TFLite): anchors, decoding, weighted NMS, letterboxing, tiling;
and :class:`Detection`, what every detector returns (:mod:`appliance.vision.detectors`).

The two MediaPipe BlazeFace models are run with the LiteRT interpreter (``ai_edge_litert``,
falling back to ``tflite_runtime``; optional: imported only when a BlazeFace model is chosen,
the default detector is YuNet on OpenCV, :mod:`appliance.vision.yunet`):

- ``full_range`` (default): 192x192 input, one SSD layer of stride 4 with one anchor per cell,
  48 * 48 = 2304 anchors; faces up to ~5 m from the camera.
- ``short_range``: 128x128 input, strides [8, 16, 16, 16] with two anchors per location per
  layer: 16 * 16 * 2 + 8 * 8 * 6 = 896 anchors; faces within ~2 m (and close-up photos).

The post-processing follows MediaPipe's ``face_detection_*_range`` graphs: the frame is
letterboxed into the square input (aspect ratio kept, normalised to [-1, 1]), the raw scores are
clipped to [-100, 100] and passed through a sigmoid, only anchors above the score threshold are
decoded (box centre/size and 6 keypoints relative to a unit-size anchor), and overlapping
detections are merged by *weighted* non-maximum suppression (coordinates averaged with the
scores as weights, the top score kept). Boxes and keypoints are mapped back to frame pixels.

Per-frame cost matters on a Raspberry Pi: the input buffer is preallocated, resizing and colour
conversion happen on the small image, and decoding is vectorised numpy over the few anchors above
the threshold.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models import model_path

_LOGGER = logging.getLogger(__name__)

NUM_KEYPOINTS = 6
KEYPOINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth", "right_ear", "left_ear")
RAW_SCORE_CLIP = 100.0
TILE_OVERLAP = 0.25


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Anchor configuration of one BlazeFace model (MediaPipe SsdAnchorsCalculator options)."""

    name: str
    input_size: int
    strides: tuple[int, ...]
    anchors_per_location: tuple[int, ...]  # after merging layers with equal strides


MODELS: dict[str, ModelSpec] = {
    # MediaPipe face_detection_full_range: num_layers 1, strides [4], interpolated scale 0.
    "full_range": ModelSpec("blazeface_full_range", 192, (4,), (1,)),
    # face_detection_short_range: num_layers 4, strides [8, 16, 16, 16], aspect ratio 1.0 plus
    # an interpolated scale: 2 anchors per layer; the three stride-16 layers share a grid.
    "short_range": ModelSpec("blazeface_short_range", 128, (8, 16), (2, 6)),
}


@dataclass(frozen=True, slots=True)
class Detection:
    """One face: box ``(x1, y1, x2, y2)`` and 6 keypoints in frame pixels, score 0..1.

    Keypoints 0-3, whatever the detector: right eye, left eye, nose tip, mouth centre (the
    subject's right eye appears on the left of the image). 4 and 5: BlazeFace's right and left
    ear, YuNet's right and left mouth corner.
    """

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)


def generate_anchors(spec: ModelSpec) -> np.ndarray:
    """Anchor centres ``(n, 2)`` (x, y) in [0, 1], in the model's output order.

    With MediaPipe's ``fixed_anchor_size: true`` every anchor has width = height = 1, so only
    the centres matter: for each layer, for each grid cell (row-major), ``anchors_per_location``
    identical centres at ``(col + 0.5) / grid, (row + 0.5) / grid``.
    """
    parts = []
    for stride, per_loc in zip(spec.strides, spec.anchors_per_location, strict=True):
        grid = math.ceil(spec.input_size / stride)
        centres = (np.arange(grid, dtype=np.float32) + 0.5) / grid
        ys, xs = np.meshgrid(centres, centres, indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], axis=1)
        parts.append(np.repeat(cells, per_loc, axis=0))
    return np.concatenate(parts, axis=0).astype(np.float32)


def decode(
    raw_boxes: np.ndarray,
    raw_scores: np.ndarray,
    anchors: np.ndarray,
    input_size: int,
    score_threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode raw model outputs into normalised boxes, scores and keypoints.

    ``raw_boxes`` is ``(n, 16)``: centre offset x, y, width, height, then 6 keypoint (x, y)
    offsets, all in input pixels relative to the anchor centre. Returns ``boxes (k, 4)`` as
    x1, y1, x2, y2 in [0, 1] of the model input, ``scores (k,)`` and ``keypoints (k, 6, 2)``, for
    the ``k`` anchors whose sigmoid score reaches ``score_threshold``.
    """
    logits = np.clip(raw_scores.reshape(-1), -RAW_SCORE_CLIP, RAW_SCORE_CLIP)
    # sigmoid(x) >= t  <=>  x >= logit(t): threshold before the exp, on all anchors.
    t = min(max(score_threshold, 1e-6), 1 - 1e-6)
    keep = np.flatnonzero(logits >= math.log(t / (1 - t)))
    if keep.size == 0:
        empty = np.zeros((0,), np.float32)
        return empty.reshape(0, 4), empty, empty.reshape(0, NUM_KEYPOINTS, 2)
    scores = 1.0 / (1.0 + np.exp(-logits[keep]))
    raw = raw_boxes[keep] / float(input_size)
    centres = anchors[keep]
    cx = raw[:, 0] + centres[:, 0]
    cy = raw[:, 1] + centres[:, 1]
    half_w = raw[:, 2] / 2.0
    half_h = raw[:, 3] / 2.0
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    kps = raw[:, 4 : 4 + 2 * NUM_KEYPOINTS].reshape(-1, NUM_KEYPOINTS, 2) + centres[:, None, :]
    return boxes.astype(np.float32), scores.astype(np.float32), kps.astype(np.float32)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(
    boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe-style weighted NMS.

    Repeatedly take the highest-scoring remaining detection, gather every remaining detection
    overlapping it by more than ``iou_threshold`` (itself included), and replace the group with
    one detection whose box and keypoints are the score-weighted mean of the group and whose score
    is the top score.
    """
    if scores.size == 0:
        return boxes, scores, keypoints
    order = np.argsort(-scores, kind="stable")
    boxes, scores, keypoints = boxes[order], scores[order], keypoints[order]
    remaining = np.arange(scores.size)
    out_b, out_s, out_k = [], [], []
    while remaining.size:
        top = remaining[0]
        overlap = _iou_one_to_many(boxes[top], boxes[remaining]) > iou_threshold
        overlap[0] = True
        group = remaining[overlap]
        weights = scores[group]
        total = float(weights.sum())
        out_b.append((boxes[group] * weights[:, None]).sum(axis=0) / total)
        out_k.append((keypoints[group] * weights[:, None, None]).sum(axis=0) / total)
        out_s.append(scores[top])
        remaining = remaining[~overlap]
    return (
        np.asarray(out_b, np.float32),
        np.asarray(out_s, np.float32),
        np.asarray(out_k, np.float32),
    )


@dataclass(frozen=True, slots=True)
class Letterbox:
    """Mapping between a source image and the square model input (aspect ratio kept)."""

    scale: float  # input pixels per source pixel
    pad_x: float  # input pixels left of the image
    pad_y: float
    width: int  # size of the resized image inside the input
    height: int

    @classmethod
    def fit(cls, src_w: int, src_h: int, size: int) -> Letterbox:
        scale = size / max(src_w, src_h)
        width = max(1, min(size, round(src_w * scale)))
        height = max(1, min(size, round(src_h * scale)))
        return cls(scale, (size - width) / 2.0, (size - height) / 2.0, width, height)

    def to_source(self, points: np.ndarray, size: int) -> np.ndarray:
        """Normalised input coordinates ``(..., 2)`` to source pixels."""
        out = np.empty_like(points)
        out[..., 0] = (points[..., 0] * size - self.pad_x) / self.scale
        out[..., 1] = (points[..., 1] * size - self.pad_y) / self.scale
        return out

    def to_input(self, points: np.ndarray, size: int) -> np.ndarray:
        """Source pixels ``(..., 2)`` to normalised input coordinates (inverse of to_source)."""
        out = np.empty_like(points, dtype=np.float64)
        out[..., 0] = (points[..., 0] * self.scale + self.pad_x) / size
        out[..., 1] = (points[..., 1] * self.scale + self.pad_y) / size
        return out


class TFLiteMissingError(RuntimeError):
    """No TFLite interpreter is installed (BlazeFace needs one; YuNet does not)."""


def _load_interpreter(path: Path, threads: int) -> Any:
    """LiteRT's interpreter (``ai_edge_litert``, else ``tflite_runtime``): an optional
    dependency, imported only when a BlazeFace model is chosen."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - depends on the platform's wheel
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
        except ImportError:
            raise TFLiteMissingError(
                "BlazeFace needs a TFLite interpreter: `pip install ai-edge-litert` (or "
                "tflite-runtime) where a wheel exists, or use detector.model = \"yunet\" "
                "(OpenCV only, the default)") from None
    return Interpreter(model_path=str(path), num_threads=threads)


def tile_windows(width: int, height: int, tiles: int) -> list[tuple[int, int, int, int]]:
    """Overlapping square-ish windows ``(x, y, w, h)``: ``tiles`` per row, rows to cover height.

    With ``tiles == 1`` the whole frame is the only window.
    """
    if tiles <= 1:
        return [(0, 0, width, height)]
    tile_w = math.ceil(width / (tiles - (tiles - 1) * TILE_OVERLAP))
    tile_h = min(height, tile_w)
    rows = 1
    if tile_h < height:
        rows = math.ceil((height - tile_h) / (tile_h * (1 - TILE_OVERLAP))) + 1
    windows = []
    for r in range(rows):
        y = 0 if rows == 1 else round(r * (height - tile_h) / (rows - 1))
        for c in range(tiles):
            x = round(c * (width - tile_w) / (tiles - 1))
            windows.append((x, y, tile_w, tile_h))
    return windows


class FaceDetector:
    """BlazeFace detector returning :class:`Detection` objects in frame pixels.

    Not thread-safe (one preallocated input buffer and interpreter): use one per thread.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        model: str = "full_range",
        score_threshold: float = 0.6,
        nms_iou: float = 0.3,
        min_face_px: int = 40,
        tiles: int = 1,
        threads: int = 2,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown BlazeFace model {model!r}: use one of {sorted(MODELS)}")
        self.spec = MODELS[model]
        self.model = model
        self.score_threshold = score_threshold
        self.nms_iou = nms_iou
        self.min_face_px = min_face_px
        self.tiles = tiles
        self.anchors = generate_anchors(self.spec)
        self._interpreter = _load_interpreter(model_path(self.spec.name, model_dir), threads)
        self._interpreter.allocate_tensors()
        inp = self._interpreter.get_input_details()[0]
        size = self.spec.input_size
        if tuple(inp["shape"]) != (1, size, size, 3):
            raise ValueError(f"{self.spec.name}: unexpected input shape {inp['shape']}")
        self._input_index = inp["index"]
        self._boxes_index, self._scores_index = self._find_outputs()
        self._canvas = np.zeros((size, size, 3), np.uint8)
        self._input = np.zeros((1, size, size, 3), np.float32)
        _LOGGER.info(
            "BlazeFace %s loaded: %d anchors, threshold %.2f, tiles %d",
            model, len(self.anchors), score_threshold, tiles,
        )

    def _find_outputs(self) -> tuple[int, int]:
        """Indices of the regressor (n, 16) and classifier (n, 1) tensors, found by shape."""
        boxes_index = scores_index = None
        n = len(self.anchors)
        for out in self._interpreter.get_output_details():
            shape = tuple(out["shape"])
            if shape == (1, n, 16):
                boxes_index = out["index"]
            elif shape == (1, n, 1):
                scores_index = out["index"]
        if boxes_index is None or scores_index is None:
            outputs = self._interpreter.get_output_details()
            details = [(o["name"], tuple(o["shape"])) for o in outputs]
            raise ValueError(f"{self.spec.name}: outputs {details} do not match {n} anchors")
        return boxes_index, scores_index

    def _run(self, image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Detect in one image (a frame or a tile); boxes/keypoints in that image's pixels."""
        size = self.spec.input_size
        h, w = image_bgr.shape[:2]
        lb = Letterbox.fit(w, h, size)
        interp = cv2.INTER_AREA if lb.scale < 1 else cv2.INTER_LINEAR
        small = cv2.resize(image_bgr, (lb.width, lb.height), interpolation=interp)
        x0, y0 = int(lb.pad_x), int(lb.pad_y)
        canvas = self._canvas
        canvas.fill(127)  # mid grey: 0 after normalisation to [-1, 1]
        cv2.cvtColor(small, cv2.COLOR_BGR2RGB, dst=canvas[y0 : y0 + lb.height, x0 : x0 + lb.width])
        np.multiply(canvas, 2.0 / 255.0, out=self._input[0], casting="unsafe")
        self._input -= 1.0
        self._interpreter.set_tensor(self._input_index, self._input)
        self._interpreter.invoke()
        raw_boxes = self._interpreter.get_tensor(self._boxes_index)[0]
        raw_scores = self._interpreter.get_tensor(self._scores_index)[0]
        lb = Letterbox(lb.scale, float(x0), float(y0), lb.width, lb.height)
        boxes, scores, kps = decode(raw_boxes, raw_scores, self.anchors, size, self.score_threshold)
        if scores.size == 0:
            return boxes, scores, kps
        boxes = lb.to_source(boxes.reshape(-1, 2, 2), size).reshape(-1, 4)
        kps = lb.to_source(kps, size)
        return boxes, scores, kps

    def detect(self, frame_bgr: np.ndarray) -> list[Detection]:
        """Faces in a BGR frame, highest score first."""
        if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.size == 0:
            raise ValueError(f"expected a BGR image (h, w, 3), got shape {frame_bgr.shape}")
        h, w = frame_bgr.shape[:2]
        windows = tile_windows(w, h, self.tiles)
        if len(windows) > 1:
            windows.append((0, 0, w, h))  # large faces cut by the tiles
        all_b, all_s, all_k = [], [], []
        for x, y, tw, th in windows:
            boxes, scores, kps = self._run(frame_bgr[y : y + th, x : x + tw])
            if scores.size:
                offset = np.array([x, y], np.float32)
                all_b.append(boxes + np.tile(offset, 2))
                all_s.append(scores)
                all_k.append(kps + offset)
        if not all_s:
            return []
        boxes, scores, kps = weighted_nms(
            np.concatenate(all_b), np.concatenate(all_s), np.concatenate(all_k), self.nms_iou
        )
        detections = []
        for box, score, kp in zip(boxes, scores, kps, strict=True):
            if float(box[2] - box[0]) < self.min_face_px:
                continue
            x1, y1 = max(0.0, float(box[0])), max(0.0, float(box[1]))
            x2, y2 = min(float(w), float(box[2])), min(float(h), float(box[3]))
            if x2 <= x1 or y2 <= y1:
                continue
            detections.append(Detection((x1, y1, x2, y2), float(score), kp.astype(np.float32)))
        return detections
