"""A synthetic walk-through at a classroom door, built from the project's real data.

A student's photo (an lfw_dev benchmark person, not one of the photos enrolled) approaches the
camera: its face grows from 30 to 120 px wide (~16 cm of face: 5 m to 1.3 m from a Camera
Module 3 at 1280x720) over 3 s at 25 fps, moving down and across a real moving scene (the
walking-strangers clip, whose passers-by are never enrolled), with sensor noise. The video ends
when the face is at its largest: the student must be recorded present before that.

Used by ``tests/bench/test_walkthrough.py`` (seconds) and ``python -m bench door``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bench.recognition import lfw_split

SIZE = (1280, 720)
FPS = 25.0
SECONDS = 3.0
FACE_FROM_PX, FACE_TO_PX = 30.0, 120.0
YUNET_TO_FACE = 1 / 0.85  # YuNet's box is ~0.85 of the face width the sizes are quoted in
BACKGROUND = "walking/strangers_walking_1080p.mp4"


@dataclass(frozen=True)
class Walkthrough:
    video: Path
    student: str  # the lfw_dev person walking in
    enrol: list[Path]  # their photos for the roster (not the one shown)
    shown: Path
    frames: int
    seconds: float

    def seconds_at(self, face_px: float) -> float:
        """Video time at which the face is ``face_px`` wide."""
        share = (face_px - FACE_FROM_PX) / (FACE_TO_PX - FACE_FROM_PX)
        return self.seconds * min(1.0, max(0.0, share))


def _face_box(photo: np.ndarray, model_dir: Path) -> tuple[float, float, float, float]:
    from appliance.vision.yunet import YuNetDetector

    dets = YuNetDetector(model_dir, min_face_px=8, input_width=0).detect(photo)
    if not dets:
        raise ValueError("no face in the walk-through photo")
    return max(dets, key=lambda d: d.width).box


def build(faces_dir: Path, out: Path, model_dir: Path, person: int = 0) -> Walkthrough:
    """Write the walk-through video to ``out`` (mp4) and say who walks in."""
    split = lfw_split(faces_dir / "lfw_dev")
    name = sorted(split.probes)[person]
    shown = split.probes[name][0]
    photo = cv2.imread(str(shown))
    x1, y1, x2, y2 = _face_box(photo, model_dir)
    face_w = (x2 - x1) * YUNET_TO_FACE
    fcx, fcy = (x1 + x2) / 2, (y1 + y2) / 2
    cap = cv2.VideoCapture(str(faces_dir / BACKGROUND))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    rng = np.random.default_rng(22)
    n = int(FPS * SECONDS)
    w, h = SIZE
    last_bg = None
    for i in range(n):
        ok, frame = cap.read()
        if ok:
            last_bg = cv2.resize(frame, SIZE, interpolation=cv2.INTER_AREA)
        assert last_bg is not None
        t = i / max(1, n - 1)
        px = FACE_FROM_PX + (FACE_TO_PX - FACE_FROM_PX) * t
        scale = px / face_w
        small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        # the face's centre walks from the upper middle down and to the left
        cx, cy = w * (0.58 - 0.18 * t), h * (0.22 + 0.33 * t)
        ox, oy = round(cx - fcx * scale), round(cy - fcy * scale)
        frame = last_bg.copy()
        sh, sw = small.shape[:2]
        fx0, fy0 = max(0, ox), max(0, oy)
        fx1, fy1 = min(w, ox + sw), min(h, oy + sh)
        frame[fy0:fy1, fx0:fx1] = small[fy0 - oy:fy1 - oy, fx0 - ox:fx1 - ox]
        noisy = frame.astype(np.float32) + rng.normal(0.0, 2.0, frame.shape)
        writer.write(np.clip(noisy, 0, 255).astype(np.uint8))
    writer.release()
    cap.release()
    return Walkthrough(out, name, list(split.enroll[name]), shown, n, SECONDS)
