"""The pipeline's parts on real frames: roster providers, status, preview, crops, restart."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.capture import VideoFileSource
from appliance.config import ApplianceSettings, load
from appliance.pipeline import Pipeline, crop_for_embedding
from appliance.recognition import FileRosterProvider
from appliance.replay import replay_video
from appliance.store import Store
from cloud_sync.protocol import AttendanceRecord

KNOWN = {"S001": ("Lin-Manuel Miranda", "lin-manuel-miranda.png"),
         "S002": ("Alex Lacamoire", "alex-lacamoire.png")}


@pytest.fixture(scope="session")
def hamilton(faces_dir: Path) -> Path:
    return faces_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"


@pytest.fixture(scope="session")
def roster_file(faces_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                ) -> Path:
    """Lin-Manuel Miranda and Alex Lacamoire enrolled with the product's enrollment code and
    the default embedder (sface)."""
    return build_roster(faces_dir, model_dir, tmp_path_factory.mktemp("roster"), "sface")


@pytest.fixture(scope="session")
def dlib_roster_file(faces_dir: Path, model_dir: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same two people enrolled with the dlib embedder."""
    return build_roster(faces_dir, model_dir, tmp_path_factory.mktemp("roster"), "dlib")


def build_roster(faces_dir: Path, model_dir: Path, directory: Path, embedder_name: str) -> Path:
    from appliance.recognition import Roster
    from appliance.vision.embedding import create_embedder, embedder_id
    from appliance.vision.enroll import embed_photo, enrollment_detector, load_image
    from cloud_sync.protocol import RosterEntry

    detector = enrollment_detector(model_dir)
    embedder = create_embedder(embedder_name, model_dir)
    entries = []
    for sid, (name, file) in KNOWN.items():
        result = embed_photo(load_image(faces_dir / "face_recognition" / "examples" / file),
                             detector, embedder)
        assert result.embedding is not None, result.reason
        entries.append(RosterEntry(student_id=sid, name=name,
                                   embeddings=[result.embedding.tolist()]))
    path = directory / "roster.json"
    Roster.from_entries(entries, embedder_id(embedder_name)).save(path)
    return path


def run_to_end(settings: ApplianceSettings, store: Store, provider: object,
               clip: Path) -> Pipeline:
    """The pipeline over every frame of ``clip`` (unpaced), stopped at the end."""
    pipeline = Pipeline(settings, store, provider, source=VideoFileSource(clip),  # type: ignore[arg-type]
                        every_frame=True, paced=False)
    pipeline.start()
    try:
        assert pipeline.wait_finished(120)
    finally:
        pipeline.stop()
    return pipeline


def settings_for(tmp_path: Path, model_dir: Path, **overrides: object) -> ApplianceSettings:
    return load(None, paths={"data_dir": tmp_path / "data", "model_dir": model_dir},
                **overrides)


def test_file_roster_provider(roster_file: Path, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    provider = FileRosterProvider(roster_file, course_id="C1", course_name="Hamilton")
    course, name, roster = provider.current(now)
    assert (course, name, roster.student_ids) == ("C1", "Hamilton", ["S001", "S002"])
    assert provider.error is None
    missing = FileRosterProvider(tmp_path / "nope.json")
    assert len(missing.current(now)[2].student_ids) == 0 and "not found" in missing.error
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    broken = FileRosterProvider(bad)
    assert len(broken.current(now)[2].student_ids) == 0 and "unreadable" in broken.error
    assert FileRosterProvider(None).error == "no roster configured"
    # the file appears later: picked up on the next check
    later = tmp_path / "later.json"
    provider = FileRosterProvider(later)
    later.write_text(roster_file.read_text())
    provider._checked = -1e9
    assert provider.current(now)[2].student_ids == ["S001", "S002"]


def test_crop_for_embedding_gives_the_same_descriptor(hamilton: Path, model_dir: Path) -> None:
    from appliance.vision.detector import FaceDetector
    from appliance.vision.embedder import FaceEmbedder

    cap = cv2.VideoCapture(str(hamilton))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 150)
    ok, frame = cap.read()
    assert ok
    dets = FaceDetector(model_dir).detect(frame)
    assert dets
    crop, moved = crop_for_embedding(frame, dets[0])
    assert crop.shape[0] < frame.shape[0] and crop.flags["C_CONTIGUOUS"]
    embedder = FaceEmbedder(model_dir)
    whole = embedder.embed(frame, dets[:1])[0]
    part = embedder.embed(crop, [moved])[0]
    assert np.abs(whole - part).max() < 1e-4


def test_status_and_preview_without_roster(hamilton: Path, model_dir: Path,
                                           tmp_path: Path) -> None:
    settings = settings_for(tmp_path, model_dir)
    store = Store(settings.paths.data_dir)
    pipeline = Pipeline(settings, store, FileRosterProvider(None),
                        source=VideoFileSource(hamilton), every_frame=True, paced=False)
    st = pipeline.status()
    assert st.camera_state == "starting" and st.frames == 0
    assert pipeline.latest_preview_jpeg() is None
    pipeline.start()
    try:
        assert pipeline.wait_finished(120)
    finally:
        pipeline.stop()
    st = pipeline.status()
    assert st.frames == 275 and st.camera_state == "ended"
    assert set(st.stage_ms) == {"decode", "detect", "track", "embed", "match"}
    assert st.stage_ms["detect"] > 0
    assert st.roster_size == 0 and st.note and "no roster" in st.note
    assert st.present == [] and st.unknown_count >= 3  # every face unknown, none embedded
    assert pipeline.embeddings == 0
    assert store.outbox_depth() == 0
    jpeg = pipeline.latest_preview_jpeg()
    assert jpeg is not None and jpeg[:2] == b"\xff\xd8"
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (360, 640, 3)
    assert pipeline.latest_preview_jpeg() is jpeg  # cached: at most ~2 encodes a second


def test_debounce_survives_a_restart(hamilton: Path, model_dir: Path, roster_file: Path,
                                     tmp_path: Path) -> None:
    """A record of S001 from 10 s ago (a previous run) suppresses a new one."""
    settings = settings_for(tmp_path, model_dir)
    db = tmp_path / "appliance.db"
    store = Store(db)
    store.add_record(AttendanceRecord(
        key=uuid.uuid4(), student_id="S001", room_id="LAB-301", device_id="dev-appliance",
        seen_at=datetime.now(UTC) - timedelta(seconds=10), confidence=0.9))
    store.close()
    report = replay_video(settings, hamilton, roster_file, store_path=db)
    assert report["records"] == []
    assert len(Store(db).records_since(datetime.now(UTC) - timedelta(hours=1))) == 1
    # and a window that has passed does not suppress it
    settings = settings_for(tmp_path, model_dir, decision={"debounce_s": 5})
    report = replay_video(settings, hamilton, roster_file, store_path=db)
    assert [r["student_id"] for r in report["records"]] == ["S001"]


def test_report_is_json(hamilton: Path, model_dir: Path, roster_file: Path,
                        tmp_path: Path) -> None:
    report = replay_video(settings_for(tmp_path, model_dir), hamilton, roster_file)
    json.dumps(report)
    assert report["frames"] == 275 and report["complete"]
    assert report["embeddings"] <= report["tracks"] * 6
    assert report["embeddings"] < report["frames"] / 5  # never every face in every frame
    # detector.detect_every_frames (3): every 3rd frame, and the frame after each of the
    # clip's 3 cuts at once (the tracks ended there)
    assert report["cuts"] == 3
    assert 275 / 3 <= report["detected_frames"] <= 275 / 3 + 1 + report["cuts"]
    assert any(r["student_id"] == "S001" for r in report["records"])


@pytest.mark.parametrize("name", ["sface", "dlib"])
def test_embedder_process_survives_being_killed(hamilton: Path, model_dir: Path,
                                                name: str) -> None:
    """The descriptor child hosts whichever embedder is configured: same numbers as in
    process, and a killed child is restarted."""
    from appliance.vision.detector import FaceDetector
    from appliance.vision.embedder_process import EmbedderProcess
    from appliance.vision.embedding import create_embedder

    cap = cv2.VideoCapture(str(hamilton))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 150)
    ok, frame = cap.read()
    assert ok
    crop, det = crop_for_embedding(frame, FaceDetector(model_dir).detect(frame)[0])
    expected = create_embedder(name, model_dir).embed(crop, [det])[0]
    proc = EmbedderProcess(model_dir, name=name)
    assert proc.start()
    try:
        vector, ms = proc.embed(crop, det)
        assert vector is not None and ms > 0
        assert np.abs(vector - expected).max() < 1e-5
        assert proc.peak_rss_mb > 10
        proc._proc.kill()
        proc._proc.wait(5)
        vector, _ = proc.embed(crop, det)  # restarted
        assert vector is not None and proc.restarts == 1
    finally:
        proc.stop()
    assert not proc.alive()


class _SometimesGrey(VideoFileSource):
    """The real clip, with every 10th frame delivered as a 2-D grey image (a broken camera)."""

    def read(self) -> np.ndarray | None:
        frame = super().read()
        if frame is not None and self._delivered % 10 == 0:
            return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        return frame


def test_bad_frames_do_not_stop_the_pipeline(hamilton: Path, model_dir: Path,
                                             tmp_path: Path) -> None:
    settings = settings_for(tmp_path, model_dir)
    pipeline = Pipeline(settings, Store(settings.paths.data_dir), FileRosterProvider(None),
                        source=_SometimesGrey(hamilton), every_frame=True, paced=False)
    pipeline.start()
    try:
        assert pipeline.wait_finished(120)
        assert pipeline.alive()
    finally:
        pipeline.stop()
    assert pipeline.frame_errors == 27 and pipeline.status().frames == 275 - 27


class _ClassProvider:
    """A scheduled class: course C1 with the two enrolled people (what the sync agent gives)."""

    def __init__(self, roster_path: Path) -> None:
        from appliance.recognition import Roster

        self.roster = Roster.load(roster_path)
        self.calls = 0

    def current(self, now: datetime) -> tuple[str | None, str | None, object]:
        self.calls += 1
        return "C1", "Musical theatre", self.roster


def test_course_from_provider_and_present_after_restart(hamilton: Path, model_dir: Path,
                                                        roster_file: Path,
                                                        tmp_path: Path) -> None:
    settings = settings_for(tmp_path, model_dir)
    store = Store(settings.paths.data_dir)
    earlier = datetime.now(UTC).replace(hour=0, minute=0, second=1)
    store.add_record(AttendanceRecord(  # recorded earlier today by a previous run
        key=uuid.uuid4(), student_id="S002", course_id="C1", room_id="LAB-301",
        device_id="dev-appliance", seen_at=earlier, confidence=0.8))
    provider = _ClassProvider(roster_file)
    pipeline = run_to_end(settings, store, provider, hamilton)
    st = pipeline.status()
    assert (st.course_id, st.course_name, st.roster_size, st.note) == (
        "C1", "Musical theatre", 2, None)
    assert [(p.student_id, p.name) for p in st.present] == [
        ("S002", "Alex Lacamoire"), ("S001", "Lin-Manuel Miranda")]
    new = [r for r in store.unsent_records(10) if r.student_id == "S001"]
    assert len(new) == 1 and new[0].course_id == "C1"
    # the record carries the track's descriptor (a "not this student" correction needs it)
    assert new[0].descriptor is not None and len(new[0].descriptor) == 128
    assert 1 <= provider.calls <= 20  # asked about once a second, not every frame


def test_pipeline_refuses_a_roster_of_another_embedder(hamilton: Path, model_dir: Path,
                                                       dlib_roster_file: Path,
                                                       tmp_path: Path) -> None:
    """A dlib roster on an sface device: nobody is matched against descriptors of another
    space; the status says why and what to do."""
    settings = settings_for(tmp_path, model_dir)
    pipeline = run_to_end(settings, Store(settings.paths.data_dir),
                          FileRosterProvider(dlib_roster_file), hamilton)
    st = pipeline.status()
    assert st.roster_size == 0 and pipeline.recorded == [] and pipeline.embeddings == 0
    assert st.note is not None
    assert "made by the dlib/dlib-resnet-v1 embedder but this device runs " \
           "sface/sface-2021dec-int8bq" in st.note
    assert 'recognition.embedder = "dlib"' in st.note


@pytest.mark.slow
def test_dlib_embedder_still_recognises_lin(hamilton: Path, model_dir: Path,
                                            dlib_roster_file: Path, tmp_path: Path) -> None:
    """The alternative embedder end to end: a dlib device with a dlib roster."""
    settings = settings_for(tmp_path, model_dir, recognition={"embedder": "dlib"})
    report = replay_video(settings, hamilton, dlib_roster_file)
    assert [r["student_id"] for r in report["records"]] == ["S001"]
    assert report["records"][0]["distance"] < settings.recognition.match_threshold()


class _StillSource:
    """A video-file-like source: the same BGR frame ``count`` times, then the end."""

    description = "still frame"
    live = False
    fps = 15.0

    def __init__(self, image: np.ndarray, count: int) -> None:
        self.image, self.count, self._delivered = image, count, 0

    def open(self) -> None:
        self._delivered = 0

    def read(self) -> np.ndarray | None:
        if self._delivered >= self.count:
            return None
        self._delivered += 1
        return self.image.copy()

    def close(self) -> None:
        pass


# LFW people (lfw_dev, never enrolled) whose face, pasted at this width into a 1280x720 frame,
# YuNet's 640 px copy finds with landmarks too rough for the quality gate, while the landmarks
# from the full-resolution crop pass it: (person, face px wide, (x, y) in the frame)
GATED_ONLY_WHEN_COARSE = [("Edward_James_Olmos", 70, (217, 203)), ("Emile_Lahoud", 70, (817, 203))]


def test_small_faces_are_gated_on_their_refined_landmarks(faces_dir: Path, model_dir: Path,
                                                           roster_file: Path,
                                                           tmp_path: Path) -> None:
    """Faces small in the detector's scaled-down input are judged by the quality gate on the
    landmarks refined at full resolution (detector.refine_landmarks), not first on the coarse
    ones: each of these faces, below the gate on its coarse landmarks and above it on its
    refined ones, gets a descriptor."""
    from appliance.vision.quality import face_quality
    from appliance.vision.yunet import YuNetDetector

    settings = settings_for(tmp_path, model_dir)
    gate = settings.recognition.min_quality
    truth_detector = YuNetDetector(model_dir, min_face_px=10, input_width=0)
    frame = np.full((720, 1280, 3), 80, np.uint8)
    boxes = []
    for person, face_px, (x, y) in GATED_ONLY_WHEN_COARSE:
        photo = cv2.imread(str(sorted((faces_dir / "lfw_dev" / person).glob("*.jpg"))[0]))
        (truth, *_) = truth_detector.detect(photo)
        x1, y1, x2, y2 = (int(v) for v in truth.box)
        m = int(0.5 * truth.width)  # the face with some context, no face beside it
        photo = photo[max(0, y1 - m):y2 + m, max(0, x1 - m):x2 + m]
        s = face_px / truth.width
        small = cv2.resize(photo, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        frame[y:y + small.shape[0], x:x + small.shape[1]] = small
        boxes.append((x, y, x + small.shape[1], y + small.shape[0]))
    pipeline = Pipeline(settings, Store(settings.paths.data_dir), FileRosterProvider(roster_file),
                        source=_StillSource(frame, 30), every_frame=True, paced=False)
    detector = pipeline.detector
    found = detector.detect(frame)
    assert len(found) == len(boxes), [(d.box, d.score) for d in found]
    for det in found:  # the premise: coarse landmarks below the gate, refined ones above it
        assert detector.needs_refine(det, 1280)  # type: ignore[attr-defined]
        assert face_quality(frame, det) < gate
        crop, moved = crop_for_embedding(frame, det)
        refined = detector.refine(crop, moved)  # type: ignore[attr-defined]
        assert refined is not None and face_quality(crop, refined) >= gate
    pipeline.start()
    try:
        assert pipeline.wait_finished(60)
    finally:
        pipeline.stop()
    assert pipeline.refined >= len(boxes)
    assert pipeline.embeddings >= len(boxes)
    assert pipeline.recorded == []  # neither is on the roster


def test_a_face_the_refine_pass_loses_keeps_the_gate(model_dir: Path) -> None:
    """When the full-resolution pass finds no face in the crop, the crop is judged on its
    coarse landmarks: a flat, featureless crop gets no descriptor."""
    from appliance.pipeline import refine_for_embedding
    from appliance.vision.detector import Detection
    from appliance.vision.quality import face_quality
    from appliance.vision.yunet import YuNetDetector

    detector = YuNetDetector(model_dir, min_face_px=24, input_width=640)
    crop = np.full((150, 150, 3), 90, np.uint8)
    kp = np.array([[62, 65], [88, 65], [75, 78], [75, 92], [66, 92], [84, 92]], np.float32)
    det = Detection((50.0, 50.0, 100.0, 110.0), 0.9, kp)
    assert detector.refine(crop, det) is None
    assert refine_for_embedding(detector, crop, det, face_quality, 0.35) is None
    assert refine_for_embedding(detector, crop, det, lambda c, d: 0.5, 0.35) == (det, 0.5)
