"""Recompute the BlazeFace -> dlib-HOG box calibration of appliance/vision/embedder.py.

    python -m bench.calibrate_boxes        # prints JSON: constants per model and their effect

Data: only people NOT in the recognition benchmark: the LFW tuning people of
``bench.recognition.lfw_split`` plus faceapi_bbt, deepface and face_recognition's knn_examples.
For every face found by both dlib's HOG detector (``face_recognition.face_locations``, the boxes
the 5-point predictor was trained on) and BlazeFace (matched by IoU > 0.3), the HOG box centre
offset and side are expressed in BlazeFace box widths; the constants are their medians. The
effect is reported as mean IoU with the HOG box and as the mean displacement of the 5 dlib
landmarks (relative to the eye distance) against the landmarks from the HOG box.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.recognition import faces_dir, lfw_split

MAX_SIDE = 1600


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def calibration_paths(root: Path) -> list[Path]:
    paths = [p for ps in lfw_split(root / "lfw_dev").tuning.values() for p in ps]
    bbt = root / "faceapi_bbt/examples/images"
    paths += sorted(bbt.rglob("*.jpg")) + sorted(bbt.rglob("*.png"))
    paths += sorted((root / "deepface/tests/unit/dataset").glob("*.jpg"))
    paths += sorted((root / "face_recognition/examples/knn_examples").rglob("*.jp*g"))
    return paths


def main() -> dict[str, Any]:
    import face_recognition

    from appliance.vision.detector import FaceDetector
    from appliance.vision.embedder import BOX_CALIBRATION, FaceEmbedder, hog_box
    from models import DEFAULT_MODEL_DIR

    root = faces_dir()
    embedder = FaceEmbedder(DEFAULT_MODEL_DIR)
    models = ("full_range", "short_range")
    detectors = {
        m: FaceDetector(DEFAULT_MODEL_DIR, model=m, score_threshold=0.5, min_face_px=10)
        for m in models
    }
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray, Path]]] = {m: [] for m in models}
    images: dict[Path, np.ndarray] = {}
    for path in calibration_paths(root):
        img = cv2.imread(str(path))
        if img is None:
            continue
        if max(img.shape[:2]) > MAX_SIDE:
            s = MAX_SIDE / max(img.shape[:2])
            img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        images[path] = img
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        locations = face_recognition.face_locations(rgb)
        hogs = [np.array([lf, t, r, b], float) for t, r, b, lf in locations]
        for m, det in detectors.items():
            for d in det.detect(img):
                box = np.array(d.box, float)
                best = max(hogs, key=lambda h, box=box: _iou(h, box), default=None)
                if best is not None and _iou(best, box) > 0.3:
                    pairs[m].append((box, best, path))
    out: dict[str, Any] = {"images": len(images)}
    for m in models:
        bf = np.array([p[0] for p in pairs[m]])
        hog = np.array([p[1] for p in pairs[m]])
        w = bf[:, 2] - bf[:, 0]
        dx = np.median(((hog[:, 0] + hog[:, 2]) - (bf[:, 0] + bf[:, 2])) / 2 / w)
        dy = np.median(((hog[:, 1] + hog[:, 3]) - (bf[:, 1] + bf[:, 3])) / 2 / w)
        scale = np.median((hog[:, 2] - hog[:, 0]) / w)
        current = BOX_CALIBRATION[m]
        iou_raw, iou_cal, lm_raw, lm_cal = [], [], [], []
        for box, ref_box, path in pairs[m]:
            img = images[path]
            cal = np.array(hog_box(box, current))
            ref = embedder.landmarks(img, ref_box)
            eye = float(np.linalg.norm(ref[0] - ref[2])) + 1e-6
            iou_raw.append(_iou(box, ref_box))
            iou_cal.append(_iou(cal, ref_box))
            lm_raw.append(float(np.abs(embedder.landmarks(img, box) - ref).mean()) / eye)
            lm_cal.append(float(np.abs(embedder.landmarks(img, cal) - ref).mean()) / eye)
        out[m] = {
            "pairs": len(pairs[m]),
            "derived": {"dx": round(float(dx), 3), "dy": round(float(dy), 3),
                        "scale": round(float(scale), 3)},
            "in_use": {"dx": current.dx, "dy": current.dy, "scale": current.scale},
            "mean_iou_with_hog_box": {"raw": round(float(np.mean(iou_raw)), 3),
                                      "calibrated": round(float(np.mean(iou_cal)), 3)},
            "landmark_shift_per_eye_distance": {"raw": round(float(np.mean(lm_raw)), 4),
                                                "calibrated": round(float(np.mean(lm_cal)), 4)},
        }
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
