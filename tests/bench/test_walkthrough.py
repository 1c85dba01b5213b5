"""The door walk-through (bench/walkthrough.py): a student's photo approaching from 30 to
120 px over 3 s across a real moving scene, 1280x720, through the whole pipeline at the shipped
defaults. The student is recorded before the face leaves the frame, while it is still under
80 px; none of the passers-by of
the real scene (never enrolled) is recorded; the placement check counted the faces."""

from __future__ import annotations

from pathlib import Path

from appliance.capture import VideoFileSource
from appliance.config import load
from appliance.pipeline import Pipeline
from appliance.recognition import FileRosterProvider, Roster
from appliance.store import Store
from appliance.vision.embedding import create_embedder, embedder_id
from appliance.vision.enroll import embed_photo, enrollment_detector, load_image
from bench.recognition import lfw_split
from bench.walkthrough import build
from cloud_sync.protocol import RosterEntry

OTHERS = 9  # other students of the class, enrolled too
PERSON = 7  # which benchmark person walks in


def _roster(people: dict[str, list[Path]], model_dir: Path, path: Path) -> None:
    detector = enrollment_detector(model_dir)
    embedder = create_embedder("sface", model_dir)
    entries = []
    for sid, photos in people.items():
        vectors = [r.embedding.tolist() for r in
                   (embed_photo(load_image(p), detector, embedder) for p in photos)
                   if r.embedding is not None]
        if vectors:
            entries.append(RosterEntry(student_id=sid, name=sid, embeddings=vectors))
    Roster.from_entries(entries, embedder_id("sface")).save(path)


def test_student_recorded_before_leaving_the_frame(faces_dir: Path, model_dir: Path,
                                                   tmp_path: Path) -> None:
    walk = build(faces_dir, tmp_path / "walk.mp4", model_dir, person=PERSON)
    split = lfw_split(faces_dir / "lfw_dev")
    others = [n for n in sorted(split.enroll) if n != walk.student][:OTHERS]
    roster = tmp_path / "roster.json"
    _roster({walk.student: walk.enrol, **{n: split.enroll[n] for n in others}}, model_dir,
            roster)
    settings = load(None, paths={"data_dir": tmp_path, "model_dir": model_dir},
                    events={"enabled": False})
    assert settings.detector.model == "yunet" and settings.camera.width == 1280
    pipeline = Pipeline(settings, Store(tmp_path / "s.db"),
                        FileRosterProvider(roster, course_id="C1", course_name="Door"),
                        source=VideoFileSource(walk.video), every_frame=True, paced=False,
                        loop=False)
    pipeline.start()
    try:
        assert pipeline.wait_finished(120)
    finally:
        pipeline.stop()
    assert pipeline.error is None
    recorded = {r.student_id: r for r in pipeline.recorded}
    assert set(recorded) == {walk.student}, recorded  # nobody of the real scene
    decided = recorded[walk.student].decided_pts_s
    # recorded well before the end: while the face was still under 80 px (about 2 m away), so
    # a student who turns away at the door is not missed (YuNet: 0.5 s, ~45 px; BlazeFace
    # full range with min 40 px, the defaults before: 2.1 s, ~95 px)
    assert decided is not None and decided < walk.seconds_at(80), decided
    placement = pipeline.status().placement
    assert placement is not None and placement.faces >= 1
    assert any(size in ("80-119", "120+") and rec for size, _, rec in placement.bands)
