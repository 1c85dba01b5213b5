"""Face quality 0..1 from size, sharpness and frontal pose, to pick the best crops to embed.

- size: the face width in pixels, 0 at :data:`MIN_SIZE_PX`, 1 from :data:`GOOD_SIZE_PX`;
- sharpness of the crop *as the embedder will see it*: variance of the Laplacian of the grey
  112x112 chip aligned from the keypoints (SFace's input; a 40 px face blown up to 112 px is
  soft, a 100 px one is not), mapped to 0..1 by ``v / (v + CHIP_SHARPNESS_HALF)``;
- frontal pose: from the BlazeFace keypoints, the nose tip should sit halfway between the eyes
  (yaw) and the eye line should be level (roll).

The three are combined as a weighted geometric mean, so one bad factor pulls the score down.
"""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np

from appliance.vision.detector import Detection

_LOGGER = logging.getLogger(__name__)

MIN_SIZE_PX = 24.0
GOOD_SIZE_PX = 100.0
SHARPNESS_PX = 64
SHARPNESS_HALF = 60.0  # Laplacian variance scoring 0.5 (the 64 px crop of :func:`sharpness`)
# On the aligned 112 px chip (median of LFW photos ~143; 50 px faces pasted in a 720p frame ~60;
# a Gaussian blur of sigma 3 ~4): 20 keeps the scores of the 64 px measure it replaces.
CHIP_SHARPNESS_HALF = 20.0
WEIGHTS = {"size": 0.35, "sharpness": 0.35, "pose": 0.3}


def size_score(det: Detection) -> float:
    return float(np.clip((det.width - MIN_SIZE_PX) / (GOOD_SIZE_PX - MIN_SIZE_PX), 0.0, 1.0))


def sharpness(frame_bgr: np.ndarray, det: Detection) -> float:
    """Variance of the Laplacian of the face crop (grey, resized to SHARPNESS_PX square)."""
    h, w = frame_bgr.shape[:2]
    x1, y1, x2, y2 = (round(v) for v in det.box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return 0.0
    crop = frame_bgr[y1:y2, x1:x2]
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    interp = cv2.INTER_AREA if (x2 - x1) > SHARPNESS_PX else cv2.INTER_LINEAR
    grey = cv2.resize(grey, (SHARPNESS_PX, SHARPNESS_PX), interpolation=interp)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def sharpness_score(value: float, half: float = SHARPNESS_HALF) -> float:
    return value / (value + half)


def chip_sharpness(frame_bgr: np.ndarray, det: Detection) -> float:
    """Variance of the Laplacian of the grey aligned chip the embedder computes from this
    detection (the crop is taken from the full-resolution frame the pipeline holds)."""
    from appliance.vision.sface import align

    try:
        chip = align(frame_bgr, det)
    except ValueError:  # keypoints define no alignment: the plain crop
        return sharpness(frame_bgr, det) * CHIP_SHARPNESS_HALF / SHARPNESS_HALF
    grey = cv2.cvtColor(chip, cv2.COLOR_BGR2GRAY) if chip.ndim == 3 else chip
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def pose_score(det: Detection) -> float:
    """1 for a frontal face, towards 0 for a turned (yaw) or tilted (roll) one."""
    kp = det.keypoints
    right_eye, left_eye, nose = kp[0], kp[1], kp[2]
    eye_vec = left_eye - right_eye
    eye_dist = float(np.hypot(*eye_vec))
    if eye_dist < 1e-6:
        return 0.0
    # yaw: where the nose projects on the eye line, 0.5 when frontal
    t = float(np.dot(nose - right_eye, eye_vec)) / (eye_dist**2)
    yaw = float(np.clip(1.0 - 2.5 * abs(t - 0.5), 0.0, 1.0))
    roll = abs(math.degrees(math.atan2(float(eye_vec[1]), float(eye_vec[0]))))
    roll_s = float(np.clip(1.0 - max(0.0, roll - 10.0) / 35.0, 0.0, 1.0))
    return yaw * roll_s


def face_quality(frame_bgr: np.ndarray, det: Detection) -> float:
    """Quality 0..1 of one detected face (higher: better to embed)."""
    parts = {
        "size": size_score(det),
        "sharpness": sharpness_score(chip_sharpness(frame_bgr, det), CHIP_SHARPNESS_HALF),
        "pose": pose_score(det),
    }
    if min(parts.values()) <= 0.0:
        return 0.0
    return float(math.exp(sum(WEIGHTS[k] * math.log(v) for k, v in parts.items())))
