"""Head pose (yaw, pitch, roll) from BlazeFace's 6 keypoints, and "facing the front".

BlazeFace gives no pose, only 6 points: right eye, left eye, nose tip, mouth, right ear, left
ear (the subject's right: the left of the image). The points are first rotated so the eye line
is level (that angle is the roll). Then, with the half distance between the eyes as the unit:

- yaw: the nose tip protrudes in front of the eyes, so when the head turns by ``yaw`` it moves
  sideways from the eyes' midpoint by about ``K_YAW * tan(yaw)`` half-eye-distances;
- pitch: the nose tip's height between the eye line and the mouth, ``(nose - eyes) / (mouth -
  eyes)``, is about :data:`NEUTRAL_NOSE_HEIGHT` for a level head; it grows when the head bends
  down (the nose tip drops towards the mouth) and shrinks when it looks up.

These are geometric approximations with constants fitted on real photos (LFW frontal faces for
the neutral pitch, profiles for the yaw scale), not a 3-D fit: good enough to tell "facing the
front" from "turned away / looking down", which is what attention needs. How good it is on
labelled photos is measured in ``tests/vision/test_headpose.py`` and quoted in
docs/RECOGNITION.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

K_YAW = 1.3  # nose offset (half eye distances) at 45 degrees of yaw
NEUTRAL_NOSE_HEIGHT = 0.54  # nose tip height between eye line (0) and mouth (1), level head
K_PITCH = 0.6  # change of that height at 45 degrees of pitch


@dataclass(frozen=True, slots=True)
class HeadPose:
    yaw: float  # degrees, + = the face turned to the image's right
    pitch: float  # degrees, + = looking down
    roll: float  # degrees

    def facing_front(self, max_yaw: float = 30.0, max_pitch: float = 25.0) -> bool:
        return abs(self.yaw) <= max_yaw and abs(self.pitch) <= max_pitch


def head_pose(keypoints: np.ndarray) -> HeadPose | None:
    """Yaw/pitch/roll in degrees from the 6 keypoints ``(6, 2)`` in pixels; None when the
    points are degenerate (eyes on top of each other)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    right_eye, left_eye, nose, mouth = kp[0], kp[1], kp[2], kp[3]
    eye_vec = left_eye - right_eye
    eye_dist = float(np.hypot(*eye_vec))
    if eye_dist < 1e-6:
        return None
    roll = math.atan2(float(eye_vec[1]), float(eye_vec[0]))
    c, s = math.cos(-roll), math.sin(-roll)
    rot = np.array([[c, -s], [s, c]])
    mid = (right_eye + left_eye) / 2.0
    n = rot @ (nose - mid) / (eye_dist / 2.0)
    m = rot @ (mouth - mid) / (eye_dist / 2.0)
    yaw = math.degrees(math.atan(float(n[0]) / K_YAW))
    if m[1] <= 1e-6:
        return HeadPose(yaw, 0.0, math.degrees(roll))
    height = float(n[1] / m[1])
    pitch = math.degrees(math.atan((height - NEUTRAL_NOSE_HEIGHT) / K_PITCH))
    return HeadPose(yaw, pitch, math.degrees(roll))
