"""dlib descriptors: identical to face_recognition's for the same box; box calibration."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.vision.detector import Detection, FaceDetector
from appliance.vision.embedder import BOX_CALIBRATION, BoxCalibration, FaceEmbedder, hog_box


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> FaceEmbedder:
    return FaceEmbedder(model_dir)


@pytest.mark.parametrize("name", ["obama.jpg", "two_people.jpg"])
def test_same_descriptor_as_face_recognition(
    embedder: FaceEmbedder, faces_dir: Path, name: str
) -> None:
    import face_recognition

    bgr = cv2.imread(str(faces_dir / "face_recognition/examples" / name))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    locations = face_recognition.face_locations(rgb)
    assert locations
    expected = np.array(face_recognition.face_encodings(rgb, locations, model="small"))
    ours = embedder.embed_boxes(bgr, [(lft, top, rgt, bot) for top, rgt, bot, lft in locations])
    assert ours.shape == (len(locations), 128) and ours.dtype == np.float32
    assert np.abs(ours - expected).max() < 1e-5


def test_blazeface_box_gives_nearly_the_hog_box_descriptor(
    embedder: FaceEmbedder, detector: FaceDetector, faces_dir: Path
) -> None:
    import face_recognition

    bgr = cv2.imread(str(faces_dir / "face_recognition/examples/biden.jpg"))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    (reference,) = face_recognition.face_encodings(rgb, model="small")
    (det,) = detector.detect(bgr)
    (ours,) = embedder.embed(bgr, [det])
    # same person, same photo: far below any match threshold (~0.4-0.6)
    assert np.linalg.norm(ours - reference) < 0.1


def test_hog_box_calibration_geometry() -> None:
    cal = BoxCalibration(dx=0.1, dy=-0.2, scale=0.5)
    assert hog_box((10, 20, 110, 120), cal) == pytest.approx((60 + 10 - 25, 70 - 20 - 25,
                                                              60 + 10 + 25, 70 - 20 + 25))
    for c in BOX_CALIBRATION.values():  # derived constants stay near an identity mapping
        assert abs(c.dx) < 0.1 and abs(c.dy) < 0.1 and 0.8 < c.scale < 1.2


def test_descriptor_of_no_detection_is_empty(embedder: FaceEmbedder) -> None:
    out = embedder.embed(np.zeros((50, 50, 3), np.uint8), [])
    assert out.shape == (0, 128)


def test_same_person_closer_than_different_people(
    embedder: FaceEmbedder, detector: FaceDetector, faces_dir: Path
) -> None:
    ex = faces_dir / "face_recognition/examples"

    def emb(name: str) -> np.ndarray:
        img = cv2.imread(str(ex / name))
        dets: list[Detection] = detector.detect(img)
        assert len(dets) == 1, name
        return embedder.embed(img, dets)[0]

    obama, obama2, biden = emb("obama.jpg"), emb("obama2.jpg"), emb("biden.jpg")
    same = np.linalg.norm(obama - obama2)
    assert same < 0.45
    assert np.linalg.norm(obama - biden) > 0.6
    assert np.linalg.norm(obama2 - biden) > 0.6


def test_flip_average_is_the_mean_with_the_mirrored_face(
    embedder: FaceEmbedder, faces_dir: Path
) -> None:
    import face_recognition

    bgr = cv2.imread(str(faces_dir / "face_recognition/examples/obama.jpg"))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    (loc,) = face_recognition.face_locations(rgb)
    top, right, bottom, left = loc
    width = rgb.shape[1]
    plain = face_recognition.face_encodings(rgb, [loc], model="small")[0]
    mirrored_loc = (top, width - 1 - left, bottom, width - 1 - right)
    mirrored = face_recognition.face_encodings(
        np.ascontiguousarray(rgb[:, ::-1]), [mirrored_loc], model="small"
    )[0]
    ours = embedder.embed_boxes(bgr, [(left, top, right, bottom)], flip_average=True)[0]
    assert np.abs(ours - (plain + mirrored) / 2).max() < 1e-5
    assert 0 < np.linalg.norm(ours - plain) < 0.15
