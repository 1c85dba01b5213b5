"""BlazeFace detector: anchor geometry, decoding, weighted NMS, letterbox; then real photos."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.config import DetectorConfig
from appliance.vision.detector import (
    MODELS,
    FaceDetector,
    Letterbox,
    decode,
    generate_anchors,
    tile_windows,
    weighted_nms,
)
from appliance.vision.detectors import detector_from_config
from appliance.vision.yunet import YuNetDetector
from tests.conftest import require

# ---------------------------------------------------------------- geometry (synthetic)


def test_full_range_anchors_one_per_cell_of_a_48_grid() -> None:
    anchors = generate_anchors(MODELS["full_range"])
    assert anchors.shape == (2304, 2)
    np.testing.assert_allclose(anchors[0], [0.5 / 48, 0.5 / 48])
    np.testing.assert_allclose(anchors[1], [1.5 / 48, 0.5 / 48])  # row-major: x varies first
    np.testing.assert_allclose(anchors[48], [0.5 / 48, 1.5 / 48])
    np.testing.assert_allclose(anchors[-1], [47.5 / 48, 47.5 / 48])


def test_short_range_anchors_match_mediapipe_layout() -> None:
    anchors = generate_anchors(MODELS["short_range"])
    assert anchors.shape == (896, 2)
    # stride 8: 16x16 grid, 2 anchors per cell
    np.testing.assert_allclose(anchors[0], anchors[1])
    np.testing.assert_allclose(anchors[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(anchors[2], [1.5 / 16, 0.5 / 16])
    # three stride-16 layers of 2 anchors each: 8x8 grid, 6 anchors per cell
    np.testing.assert_allclose(anchors[512:518], np.tile([0.5 / 8, 0.5 / 8], (6, 1)))
    np.testing.assert_allclose(anchors[518], [1.5 / 8, 0.5 / 8])
    np.testing.assert_allclose(anchors[-1], [7.5 / 8, 7.5 / 8])


def test_models_output_shapes_match_the_anchor_count(model_dir: Path) -> None:
    for name in MODELS:
        det = FaceDetector(model_dir, model=name)
        assert len(det.anchors) in (2304, 896)
        assert det.detect(np.zeros((100, 200, 3), np.uint8)) == []


def test_decode_synthetic_raw_tensor() -> None:
    spec = MODELS["full_range"]
    anchors = generate_anchors(spec)
    size = spec.input_size
    raw_boxes = np.zeros((len(anchors), 16), np.float32)
    raw_scores = np.full((len(anchors), 1), -1000.0, np.float32)  # clipped to -100
    idx = 48 * 10 + 20  # row 10, col 20
    raw_scores[idx] = 2.0
    raw_boxes[idx, :4] = [4.0, -8.0, 40.0, 48.0]  # dx, dy, w, h in input pixels
    raw_boxes[idx, 4:] = np.arange(12, dtype=np.float32)
    raw_scores[idx + 1] = 0.1  # sigmoid 0.52 < 0.6: not decoded
    boxes, scores, kps = decode(raw_boxes, raw_scores, anchors, size, 0.6)
    assert boxes.shape == (1, 4) and kps.shape == (1, 6, 2)
    assert scores[0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    cx, cy = (20.5 / 48) + 4 / size, (10.5 / 48) - 8 / size
    np.testing.assert_allclose(
        boxes[0], [cx - 20 / size, cy - 24 / size, cx + 20 / size, cy + 24 / size], atol=1e-6
    )
    expected_kps = np.arange(12, dtype=np.float32).reshape(6, 2) / size + anchors[idx]
    np.testing.assert_allclose(kps[0], expected_kps, atol=1e-6)


def test_decode_clips_huge_logits() -> None:
    anchors = generate_anchors(MODELS["short_range"])
    raw_scores = np.full((896, 1), 1e6, np.float32)
    _, scores, _ = decode(np.zeros((896, 16), np.float32), raw_scores, anchors, 128, 0.5)
    assert scores.shape == (896,) and np.all(np.isfinite(scores)) and np.all(scores <= 1.0)


def test_weighted_nms_averages_overlaps_and_keeps_separate_faces() -> None:
    boxes = np.array(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]], np.float32
    )
    scores = np.array([0.6, 0.9, 0.7], np.float32)
    kps = np.stack([np.full((6, 2), v, np.float32) for v in (0.0, 1.0, 55.0)])
    out_b, out_s, out_k = weighted_nms(boxes, scores, kps, 0.3)
    assert out_s.tolist() == pytest.approx([0.9, 0.7])
    w = np.array([0.9, 0.6]) / 1.5
    np.testing.assert_allclose(out_b[0], w[0] * boxes[1] + w[1] * boxes[0], rtol=1e-6)
    np.testing.assert_allclose(out_k[0], np.full((6, 2), w[0]), rtol=1e-6)
    np.testing.assert_allclose(out_b[1], boxes[2])


def test_weighted_nms_keeps_boxes_below_the_iou_threshold() -> None:
    boxes = np.array([[0.0, 0.0, 10.0, 10.0], [6.0, 0.0, 16.0, 10.0]], np.float32)  # IoU 0.25
    out_b, out_s, _ = weighted_nms(boxes, np.array([0.9, 0.8], np.float32),
                                   np.zeros((2, 6, 2), np.float32), 0.3)
    assert len(out_s) == 2
    np.testing.assert_allclose(out_b, boxes)


@pytest.mark.parametrize(("w", "h"), [(640, 360), (150, 150), (360, 640), (1366, 768)])
def test_letterbox_round_trip(w: int, h: int) -> None:
    lb = Letterbox.fit(w, h, 192)
    pts = np.array([[0.0, 0.0], [w, h], [w / 3, h / 2]], np.float64)
    np.testing.assert_allclose(lb.to_source(lb.to_input(pts, 192), 192), pts, atol=1e-9)
    corners = lb.to_input(np.array([[0.0, 0.0], [w, h]]), 192)
    # the image is centred, touching two opposite borders
    assert corners.min() >= -1e-9 and corners.max() <= 1 + 1e-9
    assert corners[0, 0] + corners[1, 0] == pytest.approx(1.0, abs=0.01)
    assert corners[0, 1] + corners[1, 1] == pytest.approx(1.0, abs=0.01)


def test_tile_windows_overlap_and_cover_the_frame() -> None:
    assert tile_windows(1920, 1080, 1) == [(0, 0, 1920, 1080)]
    for tiles in (2, 3, 4):
        windows = tile_windows(1920, 1080, tiles)
        covered = np.zeros((1080, 1920), bool)
        for x, y, w, h in windows:
            assert x >= 0 and y >= 0 and x + w <= 1920 and y + h <= 1080
            covered[y : y + h, x : x + w] = True
        assert covered.all()
        assert len({(x, w) for x, _, w, _ in windows}) == tiles


def test_synthetic_face_found_after_letterbox_in_the_right_place(detector: FaceDetector,
                                                                 faces_dir: Path) -> None:
    """A real face pasted at a known place in a wide synthetic frame is found there."""
    face = cv2.imread(str(faces_dir / "face_recognition/examples/obama.jpg"))
    face = cv2.resize(face, (227, 284))
    frame = np.full((720, 1280, 3), 90, np.uint8)
    frame[300:584, 900:1127] = face
    (det,) = detector.detect(frame)
    cx, cy = det.center
    assert 900 < cx < 1127 and 300 < cy < 584
    assert 50 < det.width < 227


# ---------------------------------------------------------------- real photos


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _hog_boxes(image_bgr: np.ndarray) -> list[tuple[float, float, float, float]]:
    import face_recognition

    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    return [(left, top, right, bottom)
            for top, right, bottom, left in face_recognition.face_locations(rgb)]


def _assert_sensible(det_boxes: list, hog_boxes: list) -> None:
    """Every face dlib's HOG detector finds is found by BlazeFace at about the same place."""
    for hog in hog_boxes:
        best = max((_iou(hog, b) for b in det_boxes), default=0.0)
        assert best > 0.35, f"HOG face {hog} not matched by {det_boxes}"


def test_obama_one_face(detector: FaceDetector, faces_dir: Path) -> None:
    img = cv2.imread(str(faces_dir / "face_recognition/examples/obama.jpg"))
    dets = detector.detect(img)
    assert len(dets) == 1
    d = dets[0]
    assert d.score > 0.7
    _assert_sensible([d.box for d in dets], _hog_boxes(img))
    # keypoints: eyes above the nose, nose above the mouth, right eye on the image left
    kp = d.keypoints
    assert kp.shape == (6, 2)
    assert kp[0, 0] < kp[1, 0]
    assert max(kp[0, 1], kp[1, 1]) < kp[2, 1] < kp[3, 1]
    assert d.box[0] <= kp[2, 0] <= d.box[2] and d.box[1] <= kp[2, 1] <= d.box[3]


@pytest.mark.parametrize("model", ["full_range", "short_range"])
def test_two_people(model: str, model_dir: Path, faces_dir: Path) -> None:
    det = FaceDetector(model_dir, model=model)
    img = cv2.imread(str(faces_dir / "face_recognition/examples/two_people.jpg"))
    dets = det.detect(img)
    assert len(dets) == 2
    _assert_sensible([d.box for d in dets], _hog_boxes(img))


def test_bbt_group_photos_match_labels(detector: FaceDetector, faces_dir: Path) -> None:
    root = faces_dir / "faceapi_bbt"
    labels = root / "group_photo_labels.tsv"
    require(labels.is_file(), f"{labels} missing")
    rows = [r for r in csv.reader(labels.open(), delimiter="\t") if r and not r[0].startswith("#")]
    assert len(rows) == 5
    for name, _hog_count, people in rows:
        expected = len(people.split("(")[0].split())
        img = cv2.imread(str(root / name))
        dets = detector.detect(img)
        boxes = [d.box for d in dets]
        assert len(dets) >= expected, f"{name}: {len(dets)} faces, expected {expected}"
        assert len(dets) <= expected + 2, f"{name}: {len(dets)} faces for {expected} people"
        if "bbt1" not in name:  # disguises: HOG boxes are no reference there
            _assert_sensible(boxes, _hog_boxes(img))


def test_deepface_group_photos(detector: FaceDetector, faces_dir: Path) -> None:
    root = faces_dir / "deepface/tests/unit/dataset"
    couple = cv2.imread(str(root / "couple.jpg"))
    dets = detector.detect(couple)
    assert len(dets) == 2
    _assert_sensible([d.box for d in dets], _hog_boxes(couple))
    selfie = cv2.imread(str(root / "selfie-many-people.jpg"))
    dets = detector.detect(selfie)
    assert len(dets) >= 3
    _assert_sensible([d.box for d in dets], _hog_boxes(selfie))


def test_deepface_single_portraits(detector: FaceDetector, faces_dir: Path) -> None:
    root = faces_dir / "deepface/tests/unit/dataset"
    found = 0
    paths = sorted(p for p in root.glob("img*.jpg") if p.name != "img47.jpg")
    for path in paths:
        img = cv2.imread(str(path))
        if img is None:
            continue
        if detector.detect(img):
            found += 1
    assert found >= 0.95 * len(paths)


def test_from_config_and_tiling_find_small_faces(model_dir: Path, faces_dir: Path) -> None:
    """A small group photo in the middle of a wide 1920x1080 frame: BlazeFace needs tiles to
    find its faces; YuNet finds them in one pass over a 960 px copy."""
    img = cv2.imread(str(faces_dir / "faceapi_bbt/examples/images/bbt4.jpg"))
    small = cv2.resize(img, (355, 236))  # faces ~50 px wide
    frame = np.full((1080, 1920, 3), 60, np.uint8)
    frame[400:636, 800:1155] = small
    blaze = DetectorConfig(model="full_range", min_face_px=20)
    plain = detector_from_config(blaze, model_dir)
    tiled = detector_from_config(blaze.model_copy(update={"tiles": 3}), model_dir)
    yunet = detector_from_config(DetectorConfig(model="yunet", min_face_px=20, input_width=960),
                                 model_dir)
    assert isinstance(yunet, YuNetDetector)
    n_plain, n_tiled = len(plain.detect(frame)), len(tiled.detect(frame))
    assert n_tiled >= 5
    assert n_tiled > n_plain  # 1 tile: the faces are ~5 px in the 192 px input
    found = yunet.detect(frame)
    assert len(found) >= 5
    for d in tiled.detect(frame) + found:
        assert 790 < d.center[0] < 1165 and 390 < d.center[1] < 646
