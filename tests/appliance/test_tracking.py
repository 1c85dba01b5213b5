"""Tracking: synthetic geometry, and the real hamilton clip."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.tracking import Tracker, iou_matrix
from appliance.vision.detector import Detection


def det(cx: float, cy: float, size: float = 60.0, score: float = 0.9) -> Detection:
    h = size / 2
    return Detection((cx - h, cy - h, cx + h, cy + h), score, np.zeros((6, 2), np.float32))


def test_iou_matrix() -> None:
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]], np.float32)
    m = iou_matrix(a, b)
    assert m.shape == (2, 3)
    assert m[0, 0] == pytest.approx(1.0)
    assert m[0, 1] == pytest.approx(50 / 150)
    assert m[1].max() == 0.0
    assert iou_matrix(a, np.zeros((0, 4), np.float32)).shape == (2, 0)


def test_face_walking_through_the_door_is_one_track() -> None:
    tracker = Tracker()
    ids = set()
    # walks left to right, 25 px per frame (little overlap at small sizes), growing as it nears
    for i in range(40):
        tracks = tracker.update([det(40 + 25 * i, 200 + i, size=50 + i)], i)
        assert len(tracks) == 1
        ids.add(tracks[0].track_id)
    assert ids == {1}
    assert tracker.tracks[0].hits == 40


def test_two_faces_keep_their_ids_and_missed_frames() -> None:
    tracker = Tracker(max_missed=3)
    for i in range(10):
        dets = [det(100 + 5 * i, 100), det(400 - 5 * i, 300)]
        if i in (4, 5):
            dets = dets[1:]  # the first face is hidden for two frames
        tracks = tracker.update(dets[::-1] if i % 2 else dets, i)  # order must not matter
        by_id = {t.track_id: t for t in tracks}
        assert set(by_id) == {1, 2}
        if i not in (4, 5):
            assert by_id[1].box[0] == pytest.approx(100 + 5 * i - 30)
            assert by_id[2].box[1] == pytest.approx(270)
    assert tracker.total_tracks == 2


def test_track_expires_and_new_face_gets_new_id() -> None:
    tracker = Tracker(max_missed=2)
    tracker.update([det(100, 100)], 0)
    for i in range(1, 3):
        assert [t.track_id for t in tracker.update([], i)] == [1]
    assert tracker.update([], 3) == [] and [t.track_id for t in tracker.expired] == [1]
    tracks = tracker.update([det(100, 100)], 4)
    assert [t.track_id for t in tracks] == [2]
    # a face far away from an existing track is a new track, not a jump
    tracks = tracker.update([det(100, 100), det(500, 100)], 5)
    assert sorted(t.track_id for t in tracks) == [2, 3]
    assert [t.track_id for t in tracker.flush()] == [2, 3] and tracker.tracks == []


def test_detection_every_third_frame_keeps_an_approaching_face() -> None:
    """detector.detect_every_frames = 3: the tracker sees frames 0, 3, 6, ... A face coming
    towards the camera grows 10 % per frame (33 % between two detections) while moving 12 px
    per frame: one track. The allowed change of size and the predicted box are counted over
    the frames since the face was seen, not one frame per detector pass."""
    tracker = Tracker()
    ids = set()
    for i in range(0, 24, 3):
        tracks = tracker.update([det(300 + 12 * i, 200, size=30 * 1.1 ** i)], i)
        assert len(tracks) == 1
        ids.add(tracks[0].track_id)
    assert ids == {1}


def test_expiry_counts_frames_not_detector_passes() -> None:
    """Detections every 3rd frame, max_missed 8: a face unseen since frame 0 is gone at frame
    9 (9 frames), after three detector passes without it."""
    tracker = Tracker(max_missed=8)
    tracker.update([det(100, 100)], 0)
    assert [t.track_id for t in tracker.update([], 3)] == [1]
    assert [t.track_id for t in tracker.update([], 6)] == [1]
    assert tracker.update([], 9) == [] and [t.track_id for t in tracker.expired] == [1]


def test_size_jump_is_not_associated() -> None:
    tracker = Tracker()
    tracker.update([det(200, 200, size=40)], 0)
    tracks = tracker.update([det(205, 205, size=120)], 1)  # different face in front
    assert sorted(t.track_id for t in tracks) == [1, 2]


@pytest.mark.slow
def test_hamilton_clip_tracks_are_few_and_stable(faces_dir: Path, model_dir: Path) -> None:
    from appliance.vision.detector import FaceDetector

    clip = faces_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"
    detector = FaceDetector(model_dir)
    tracker = Tracker()
    cap = cv2.VideoCapture(str(clip))
    frames = detections = 0
    hits: dict[int, int] = {}
    span: dict[int, tuple[int, int]] = {}
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        dets = detector.detect(frame)
        detections += len(dets)
        for t in tracker.update(dets, frames):
            hits[t.track_id] = t.hits
            span[t.track_id] = (t.first_frame, t.last_frame)
        frames += 1
    cap.release()
    assert frames == 275 and detections > 250
    # a handful of people on stage: few tracks, and the main face keeps one id through its
    # shot (detections were matched to an existing track, not restarted)...
    assert tracker.total_tracks <= 12
    assert max(hits.values()) >= 120
    assert sum(hits.values()) == detections
    # ...but no track jumps to another face across the camera cut between frames 210 and 211
    assert not [tid for tid, (a, b) in span.items() if a <= 210 < b]


def test_cut_and_split_give_new_ids() -> None:
    tracker = Tracker()
    (a,) = tracker.update([det(100, 100)], 0)
    ended = tracker.cut()
    assert ended == [a] and tracker.tracks == [] and tracker.expired == [a]
    (b,) = tracker.update([det(100, 100)], 1)  # the same place after the cut: a new face
    assert b.track_id != a.track_id
    b.data["state"] = "x"
    old = tracker.split(b, pts_s=2.0)
    assert old != b.track_id and b.data == {} and b.first_pts_s == 2.0
    assert tracker.total_tracks == 3


def _clip_cuts(path: Path) -> list[int]:
    from appliance.tracking import CutDetector

    cuts = CutDetector()
    cap = cv2.VideoCapture(str(path))
    found, index = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if cuts.update(frame):
            found.append(index)
        index += 1
    cap.release()
    return found


def test_cut_detector_on_real_clips(faces_dir: Path) -> None:
    """The Hamilton clip's three camera cuts (frames 20, 82, 211) and nothing else; none in
    the walking clip (one continuous shot of people close to the camera)."""
    assert _clip_cuts(faces_dir / "face_recognition/examples/short_hamilton_clip.mp4") == \
        [20, 82, 211]
    assert _clip_cuts(faces_dir / "walking/strangers_walking_1080p.mp4") == []
