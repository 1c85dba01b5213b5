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


OTHERS = 9  # other students of the class, enrolled too
PERSON = 7  # which benchmark person walks in


def _roster(people: dict[str, list[Path]], model_dir: Path, path: Path,
            detector_model: str) -> None:
    from appliance.recognition import Roster
    from appliance.vision.embedding import create_embedder, embedder_id
    from appliance.vision.enroll import embed_photo, enrollment_detector, load_image
    from cloud_sync.protocol import RosterEntry

    detector = enrollment_detector(model_dir, detector_model)
    embedder = create_embedder("sface", model_dir)
    entries = []
    for sid, photos in people.items():
        vectors = [r.embedding.tolist() for r in
                   (embed_photo(load_image(p), detector, embedder) for p in photos)
                   if r.embedding is not None]
        if vectors:
            entries.append(RosterEntry(student_id=sid, name=sid, embeddings=vectors))
    Roster.from_entries(entries, embedder_id("sface")).save(path)


def run(faces_dir: Path, model_dir: Path, tmp: Path, detector: dict[str, object] | None = None,
        person: int = PERSON) -> dict[str, object]:
    """The walk-through through the whole pipeline (replay of every frame) at the default
    settings, or with ``detector`` overrides: who was recorded, and when."""
    from appliance.capture import VideoFileSource
    from appliance.config import load
    from appliance.pipeline import Pipeline
    from appliance.recognition import FileRosterProvider
    from appliance.store import Store

    walk = build(faces_dir, tmp / "walk.mp4", model_dir, person=person)
    split = lfw_split(faces_dir / "lfw_dev")
    others = [n for n in sorted(split.enroll) if n != walk.student][:OTHERS]
    settings = load(None, paths={"data_dir": tmp, "model_dir": model_dir},
                    events={"enabled": False}, detector=detector or {})
    roster = tmp / "roster.json"
    _roster({walk.student: walk.enrol, **{n: split.enroll[n] for n in others}}, model_dir,
            roster, settings.detector.model)
    store = Store(tmp / "s.db")
    pipeline = Pipeline(settings, store,
                        FileRosterProvider(roster, course_id="C1", course_name="Door"),
                        source=VideoFileSource(walk.video), every_frame=True, paced=False,
                        loop=False)
    pipeline.start()
    try:
        finished = pipeline.wait_finished(300)
    finally:
        pipeline.stop()
        store.close()
    recorded = {r.student_id: r for r in pipeline.recorded}
    mine = recorded.get(walk.student)
    decided = mine.decided_pts_s if mine else None
    face_px = (None if decided is None else
               round(FACE_FROM_PX + (FACE_TO_PX - FACE_FROM_PX) * decided / walk.seconds, 1))
    return {
        "finished": finished, "error": repr(pipeline.error) if pipeline.error else None,
        "detector": settings.detector.model, "student": walk.student,
        "recorded": sorted(recorded), "others_recorded": sorted(set(recorded) - {walk.student}),
        "student_recorded_at_s": decided, "face_px_when_recorded": face_px,
        "seconds": walk.seconds, "deadline_80px_s": round(walk.seconds_at(80), 2),
        "placement": pipeline.status().placement,
    }
