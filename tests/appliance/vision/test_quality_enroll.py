"""Face quality and the one-face enrolment helper, on real photos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.vision.detector import Detection, FaceDetector
from appliance.vision.embedder import FaceEmbedder
from appliance.vision.enroll import decode_image, embed_photo, enrollment_detector, load_image
from appliance.vision.quality import face_quality, pose_score, sharpness


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> FaceEmbedder:
    return FaceEmbedder(model_dir)


@pytest.fixture(scope="module")
def enroll_detector(model_dir: Path) -> FaceDetector:
    return enrollment_detector(model_dir)


def _one(detector: FaceDetector, img: np.ndarray) -> Detection:
    (det,) = detector.detect(img)
    return det


def test_quality_prefers_sharp_big_frontal(
    detector: FaceDetector, faces_dir: Path, model_dir: Path
) -> None:
    img = cv2.imread(str(faces_dir / "face_recognition/examples/obama.jpg"))
    det = _one(detector, img)
    q_sharp = face_quality(img, det)
    assert 0.5 < q_sharp <= 1.0
    blurred = cv2.GaussianBlur(img, (0, 0), 6)
    assert sharpness(blurred, det) < sharpness(img, det) / 5
    assert face_quality(blurred, det) < q_sharp
    small = cv2.resize(img, None, fx=0.1, fy=0.1, interpolation=cv2.INTER_AREA)
    small_det = max(FaceDetector(model_dir, min_face_px=8).detect(small),
                    key=lambda d: d.width)
    assert face_quality(small, small_det) < q_sharp


def test_pose_score_from_keypoints() -> None:
    def det(nose_x: float, left_eye_y: float = 40.0) -> Detection:
        kp = np.array([[30, 40], [70, left_eye_y], [nose_x, 60], [50, 80], [10, 50], [90, 50]],
                      np.float32)
        return Detection((0.0, 0.0, 100.0, 100.0), 0.9, kp)

    assert pose_score(det(50)) == pytest.approx(1.0)
    assert pose_score(det(62)) < 0.5  # turned head: nose near one eye
    assert pose_score(det(50, left_eye_y=80)) < pose_score(det(50))  # strongly tilted


def test_enroll_accepts_a_portrait(enroll_detector: FaceDetector, embedder: FaceEmbedder,
                                   faces_dir: Path) -> None:
    img = load_image(faces_dir / "face_recognition/examples/biden.jpg")
    result = embed_photo(img, enroll_detector, embedder)
    assert result.ok and result.reason is None
    assert result.embedding is not None and result.embedding.shape == (128,)
    assert 0 < result.quality <= 1


def test_enroll_rejections(enroll_detector: FaceDetector, embedder: FaceEmbedder,
                           faces_dir: Path) -> None:
    ex = faces_dir / "face_recognition/examples"
    two = embed_photo(load_image(ex / "two_people.jpg"), enroll_detector, embedder)
    assert not two.ok and two.reason == "2 faces"
    none = embed_photo(np.full((300, 300, 3), 128, np.uint8), enroll_detector, embedder)
    assert none.reason == "no face"
    img = load_image(ex / "obama.jpg")
    tiny = cv2.resize(img, None, fx=0.08, fy=0.08, interpolation=cv2.INTER_AREA)
    small = embed_photo(tiny, enroll_detector, embedder, min_face_px=40)
    assert small.reason is not None and small.reason.startswith("face too small (")
    assert small.reason.endswith(" px)")
    blurred = embed_photo(cv2.GaussianBlur(img, (0, 0), 8), enroll_detector, embedder)
    assert blurred.reason == "blurred"


def test_enroll_reads_webp_by_content(faces_dir: Path) -> None:
    path = faces_dir / "deepface/tests/unit/dataset/img47.jpg"  # a WebP named .jpg
    img = load_image(path)
    assert img.ndim == 3
    assert decode_image(path.read_bytes()).shape == img.shape
    with pytest.raises(ValueError, match="not an image"):
        decode_image(b"not an image")


def test_enroll_tight_crops_via_border_retry(enroll_detector: FaceDetector,
                                             embedder: FaceEmbedder, faces_dir: Path,
                                             model_dir: Path) -> None:
    crop = load_image(faces_dir / "faceapi_bbt/examples/images/amy/amy1.png")  # 150x150 grey
    blaze = enrollment_detector(model_dir, "full_range")
    assert blaze.detect(crop) == []  # the face fills the photo: full range misses it
    assert embed_photo(crop, enroll_detector, embedder).ok  # the default (YuNet)
    result = embed_photo(crop, blaze, embedder)
    assert result.ok, result.reason
    assert result.detection is not None
    x1, y1, x2, y2 = result.detection.box
    assert -20 < x1 < x2 < 170 and -20 < y1 < y2 < 170  # mapped back to the crop's pixels
