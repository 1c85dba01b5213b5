"""SFace on real photos: unit-length descriptors, same person close, different people far,
alignment onto the 112x112 template, and the model file from the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.vision.detector import FaceDetector
from appliance.vision.enroll import detect_still, load_image
from appliance.vision.sface import CHIP, TEMPLATE_BLAZEFACE, SFaceEmbedder, alignment_matrix


@pytest.fixture(scope="module")
def sface(model_dir: Path) -> SFaceEmbedder:
    return SFaceEmbedder(model_dir)


def _embed(sface: SFaceEmbedder, detector: FaceDetector, path: Path) -> np.ndarray:
    image = load_image(path)
    dets = detect_still(image, detector)
    assert len(dets) == 1
    return sface.embed(image, dets)[0]


def test_same_person_close_other_far(sface: SFaceEmbedder, detector: FaceDetector,
                                     faces_dir: Path) -> None:
    ex = faces_dir / "face_recognition/examples"
    obama, obama2, biden = (_embed(sface, detector, ex / n)
                            for n in ("obama.jpg", "obama2.jpg", "biden.jpg"))
    for v in (obama, obama2, biden):
        assert v.shape == (128,) and abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    assert 1.0 - float(obama @ obama2) < 0.4  # cosine distance, default threshold 0.50
    assert 1.0 - float(obama @ biden) > 0.7


def test_alignment_maps_keypoints_onto_the_template(detector: FaceDetector,
                                                    faces_dir: Path) -> None:
    image = load_image(faces_dir / "face_recognition/examples/obama.jpg")
    (det,) = detector.detect(image)
    matrix = alignment_matrix(det.keypoints)
    mapped = det.keypoints[:4] @ matrix[:, :2].T + matrix[:, 2]
    assert np.abs(mapped - TEMPLATE_BLAZEFACE).max() < 0.12 * CHIP  # eyes, nose, mouth


def test_no_detection_gives_no_descriptor(sface: SFaceEmbedder) -> None:
    assert sface.embed(np.zeros((100, 100, 3), np.uint8), []).shape == (0, 128)
