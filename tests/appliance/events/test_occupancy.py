"""Occupancy counts of the counting pass against counts made by hand (by looking at each
image), on group photos shrunk to a whole-room view (faces ~24 px in 480x270) and on frames of
the Hamilton clip."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.config import load
from appliance.events import ClassroomEvents
from appliance.events.occupancy import Count, Occupancy, count_people
from appliance.events.rate import RateGate
from appliance.vision.detector import FaceDetector

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

# people whose face can be seen, counted by eye on the full-size photos
GROUP_PHOTOS = {
    "deepface/tests/unit/dataset/couple.jpg": 2,
    "faceapi_bbt/examples/images/bbt1.jpg": 4,  # four seated on a sofa, beards (disguise)
    "faceapi_bbt/examples/images/bbt2.jpg": 3,  # + 2 background people turned away
    "faceapi_bbt/examples/images/bbt3.jpg": 5,
    "faceapi_bbt/examples/images/bbt4.jpg": 6,
    "faceapi_bbt/examples/images/bbt5.jpg": 5,
}
SELFIE = "deepface/tests/unit/dataset/selfie-many-people.jpg"  # 7 by eye, 3 cut by the edges
HAMILTON_FRAMES = {0: 2, 90: 1, 135: 1, 180: 1, 225: 4, 270: 4}  # frame index: faces by eye


@pytest.fixture(scope="module")
def counter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ClassroomEvents:
    """The counting pass exactly as the defaults configure it."""
    settings = load(None, paths={"data_dir": tmp_path_factory.mktemp("d"),
                                 "model_dir": model_dir})
    return ClassroomEvents(settings, store=None)  # type: ignore[arg-type]  # counting only


def whole_room_view(image: np.ndarray, reference: FaceDetector, face_px: float = 24.0,
                    ) -> np.ndarray:
    """The photo shrunk so its median face is ``face_px`` wide, on a 480x270 frame."""
    widths = [d.width for d in reference.detect(image)]
    scale = face_px / float(np.median(widths))
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frame = np.full((270, 480, 3), 90, np.uint8)
    h, w = min(small.shape[0], 270), min(small.shape[1], 480)
    y, x = (270 - h) // 2, (480 - w) // 2
    frame[y:y + h, x:x + w] = small[:h, :w]
    return frame


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> FaceDetector:
    return FaceDetector(model_dir, min_face_px=8)


@pytest.mark.parametrize(("name", "by_eye"), sorted(GROUP_PHOTOS.items()))
def test_group_photo_counts(faces_dir: Path, counter: ClassroomEvents, reference: FaceDetector,
                            name: str, by_eye: int) -> None:
    frame = whole_room_view(cv2.imread(str(faces_dir / name)), reference)
    assert len(counter.counter.detect(frame)) == by_eye
    # the pipeline's default detector (no tiles, 40 px minimum) sees none of these faces
    assert reference.min_face_px < 40


def test_selfie_partial_faces(faces_dir: Path, counter: ClassroomEvents,
                              reference: FaceDetector) -> None:
    """A hard case kept honest: faces cut by the frame's edge and a huge close face are
    missed; at least the 4 whole faces are counted, never more than the 7 there are."""
    frame = whole_room_view(cv2.imread(str(faces_dir / SELFIE)), reference)
    assert 4 <= len(counter.counter.detect(frame)) <= 7


def test_hamilton_frames(faces_dir: Path, counter: ClassroomEvents) -> None:
    cap = cv2.VideoCapture(str(faces_dir / "face_recognition" / "examples"
                               / "short_hamilton_clip.mp4"))
    counted = {}
    index = 0
    while True:
        ok, image = cap.read()
        if not ok:
            break
        if index in HAMILTON_FRAMES:
            view = cv2.resize(image, (480, 270), interpolation=cv2.INTER_AREA)
            counted[index] = len(counter.counter.detect(view))
        index += 1
    cap.release()
    assert counted == HAMILTON_FRAMES


def test_count_people_adds_turned_away_tracks() -> None:
    faces = [(10, 10, 30, 30), (100, 10, 120, 30)]
    tracks = [(11, 10, 31, 30), (200, 10, 220, 30)]  # one seen, one whose face turned away
    assert count_people(faces, tracks) == Count(2, 1)
    assert count_people([], tracks) == Count(0, 2)
    assert count_people(faces, []).people == 2


def test_occupancy_median_and_capacity() -> None:
    occ = Occupancy(window_s=10, capacity=30)
    for k, n in enumerate([20, 20, 3, 21, 20]):  # one bad count (3) does not move it
        occ.add(T0 + timedelta(seconds=k), Count(n, 0))
    payload = occ.payload()
    assert payload is not None
    assert (payload.count, payload.free, payload.occupied_share) == (20, 10, 0.667)
    occ.add(T0 + timedelta(seconds=30), Count(5, 1))  # the old counts leave the window
    assert occ.smoothed() == 6


def test_rate_gate() -> None:
    gate = RateGate(min_interval_s=30, max_interval_s=300)
    assert gate.due(T0, changed=False)
    gate.sent(T0)
    assert not gate.due(T0 + timedelta(seconds=10), changed=True)   # too soon
    assert gate.due(T0 + timedelta(seconds=31), changed=True)       # a change, after 30 s
    assert not gate.due(T0 + timedelta(seconds=299), changed=False)
    assert gate.due(T0 + timedelta(seconds=300), changed=False)     # at least every 300 s
