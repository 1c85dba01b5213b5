"""YuNet (the default detector, cv2.FaceDetectorYN): keypoints, the downscaled input mapped
back to frame pixels, small faces in a 720p frame, and that it needs no TFLite runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.config import DetectorConfig
from appliance.vision.detector import TFLiteMissingError
from appliance.vision.detectors import create_detector, detector_from_config
from appliance.vision.yunet import YuNetDetector


@pytest.fixture(scope="module")
def yunet(model_dir: Path) -> YuNetDetector:
    return YuNetDetector(model_dir, min_face_px=10, input_width=0)


def _photo(faces_dir: Path) -> np.ndarray:
    image = cv2.imread(str(faces_dir / "face_recognition/examples/obama.jpg"))
    assert image is not None
    return image


def test_default_detector_is_yunet(model_dir: Path) -> None:
    assert DetectorConfig().model == "yunet"
    assert isinstance(detector_from_config(DetectorConfig(), model_dir), YuNetDetector)


def test_keypoints_follow_the_common_order(yunet: YuNetDetector, faces_dir: Path) -> None:
    """0 right eye (image left), 1 left eye, 2 nose tip, 3 mouth centre = mean of 4 and 5."""
    (det,) = yunet.detect(_photo(faces_dir))
    kp = det.keypoints
    assert kp.shape == (6, 2)
    assert kp[0, 0] < kp[2, 0] < kp[1, 0]
    assert kp[0, 1] < kp[2, 1] < kp[3, 1]
    np.testing.assert_allclose(kp[3], (kp[4] + kp[5]) / 2, atol=1e-3)
    x1, y1, x2, y2 = det.box
    assert all(x1 < x < x2 and y1 < y < y2 for x, y in kp)
    assert det.score > 0.8


def test_downscaled_input_maps_back_to_frame_pixels(model_dir: Path, faces_dir: Path) -> None:
    """A ~75 px face in a 1280x720 frame: found on a 640 px copy at the same place as at full
    resolution, within 2 pixels of the copy (4 frame pixels)."""
    photo = _photo(faces_dir)
    small = cv2.resize(photo, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)
    frame = np.full((720, 1280, 3), 90, np.uint8)
    frame[300:300 + small.shape[0], 700:700 + small.shape[1]] = small
    full = YuNetDetector(model_dir, min_face_px=10, input_width=0).detect(frame)
    half = YuNetDetector(model_dir, min_face_px=10, input_width=640).detect(frame)
    assert len(full) == len(half) == 1
    np.testing.assert_allclose(half[0].box, full[0].box, atol=4.0)
    np.testing.assert_allclose(half[0].keypoints, full[0].keypoints, atol=4.0)
    assert 700 < half[0].center[0] < 700 + small.shape[1]


def test_small_faces_in_a_720p_frame(model_dir: Path, faces_dir: Path) -> None:
    """Eight LFW people 30-60 px wide in a 1280x720 frame: YuNet (input 640) finds them in
    one pass; BlazeFace full range without tiles (the default before) finds almost none."""
    people = sorted((faces_dir / "lfw_dev").iterdir())[:8]
    frame = np.full((720, 1280, 3), 70, np.uint8)
    boxes = []
    for i, person in enumerate(people):
        photo = cv2.imread(str(sorted(person.glob("*.jpg"))[0]))
        face_px = 30 + 30 * (i % 4) / 3  # 30, 40, 50, 60: the photo's face is ~0.45 of it
        s = face_px / (0.45 * photo.shape[1])
        small = cv2.resize(photo, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        x, y = 80 + 150 * i, 150 + 250 * (i % 2)
        frame[y:y + small.shape[0], x:x + small.shape[1]] = small
        boxes.append((x, y, x + small.shape[1], y + small.shape[0]))
    found = detector_from_config(DetectorConfig(model="yunet", min_face_px=24),
                                 model_dir).detect(frame)
    hits = sum(any(b[0] < d.center[0] < b[2] and b[1] < d.center[1] < b[3] for d in found)
               for b in boxes)
    assert hits >= 7, [d.box for d in found]
    assert len(found) <= len(boxes)  # nothing found in the plain background
    blaze = create_detector(model_dir, "full_range", min_face_px=20)
    assert len(blaze.detect(frame)) <= 2


def test_refine_gives_full_resolution_landmarks(model_dir: Path, faces_dir: Path) -> None:
    """Faces 50 px wide in a 1280x720 frame (25 px in the 640 px copy YuNet runs on): the
    landmarks from a pass on the full-resolution crop (detector.refine_landmarks) are nearer
    to those of the person's photo at its own size than the landmarks from the copy are."""
    from appliance.pipeline import crop_for_embedding

    truth_detector = YuNetDetector(model_dir, min_face_px=10, input_width=0)
    shipped = YuNetDetector(model_dir, min_face_px=10, input_width=640)
    coarse_err, refined_err = [], []
    for person in sorted((faces_dir / "lfw_dev").iterdir())[:12]:
        photo = cv2.imread(str(sorted(person.glob("*.jpg"))[0]))
        (truth, *_) = truth_detector.detect(photo)
        s = 50.0 / truth.width
        small = cv2.resize(photo, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        frame = np.full((720, 1280, 3), 80, np.uint8)
        x, y = 517, 203  # odd offsets: no alignment with the 2x downscale's grid
        frame[y:y + small.shape[0], x:x + small.shape[1]] = small
        want = truth.keypoints[:4] * s + np.array([x, y], np.float32)
        found = [d for d in shipped.detect(frame) if d.width > 30]
        if not found:
            continue
        det = found[0]
        assert shipped.needs_refine(det, 1280)
        assert not truth_detector.needs_refine(det, 1280)  # full resolution already
        crop, moved = crop_for_embedding(frame, det)
        refined = shipped.refine(crop, moved)
        assert refined is not None
        offset = np.array([det.box[0] - moved.box[0], det.box[1] - moved.box[1]], np.float32)
        eye = float(np.linalg.norm(want[1] - want[0]))
        coarse_err.append(float(np.abs(det.keypoints[:4] - want).mean()) / eye)
        refined_err.append(float(np.abs(refined.keypoints[:4] + offset - want).mean()) / eye)
    assert len(coarse_err) >= 10
    assert np.mean(refined_err) < 0.8 * np.mean(coarse_err), (coarse_err, refined_err)


def test_no_faces_in_a_plain_or_noisy_frame(yunet: YuNetDetector) -> None:
    rng = np.random.default_rng(3)
    assert yunet.detect(np.full((480, 640, 3), 128, np.uint8)) == []
    assert yunet.detect(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="BGR"):
        yunet.detect(np.zeros((10, 10), np.uint8))


def test_yunet_needs_no_tflite_runtime(model_dir: Path, faces_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ai_edge_litert and tflite_runtime (Python 3.13 on aarch64 has no wheel):
    YuNet detects, BlazeFace says what is missing and what to do."""
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    assert create_detector(model_dir, "yunet").detect(_photo(faces_dir))
    with pytest.raises(TFLiteMissingError, match="yunet"):
        create_detector(model_dir, "full_range")
