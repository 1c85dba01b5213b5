"""`appliance roster build` and `appliance identify` on real photos (symlinked, never copied)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from appliance.cli import app
from appliance.config import RecognitionConfig
from appliance.recognition import Roster
from bench.montage import enrolment_clip

THRESHOLD = RecognitionConfig().match_threshold()  # the default embedder's (sface)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def env(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_PATHS__MODEL_DIR", str(model_dir))
    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)


def _link(dst: Path, src: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, faces_dir: Path, model_dir: Path) -> Path:
    """A roster of the knn_examples train people: S001 obama (2 photos), S002 biden (2),
    S003 kit_harington (2), S004 = two_people.jpg (rejected: 2 faces), S005 = not an image."""
    mp = pytest.MonkeyPatch()
    mp.setenv("APPLIANCE_PATHS__MODEL_DIR", str(model_dir))
    mp.delenv("APPLIANCE_CONFIG", raising=False)
    photos = tmp_path_factory.mktemp("photos")
    train = faces_dir / "face_recognition/examples/knn_examples/train"
    for sid, person in (("S001", "obama"), ("S002", "biden"), ("S003", "kit_harington")):
        for src in sorted((train / person).iterdir()):
            _link(photos / sid / src.name, src)
    _link(photos / "S004.jpg", faces_dir / "face_recognition/examples/two_people.jpg")
    (photos / "S005.jpg").write_bytes(b"not a photo")
    (photos / "names.csv").write_text("student_id,name\nS001,Barack Obama\nS002,Joe Biden\n")
    out = tmp_path_factory.mktemp("out") / "roster.json"
    result = CliRunner().invoke(app, ["roster", "build", str(photos), "-o", str(out)])
    mp.undo()
    assert result.exit_code == 0, result.output
    assert "enrolled 3 students (6 photos, 2 rejected, sface descriptors)" in result.output
    # 2 photos each: fewer than the 3-5 recommended, and said so
    assert "3 students have fewer than 3 usable photos (3-5 recommended): S001, S002, S003" \
        in result.output
    assert "S004.jpg: 2 faces" in result.output
    assert "S005.jpg: " in result.output and "not an image" in result.output
    return out


def test_roster_build_writes_roster(built: Path) -> None:
    roster = Roster.load(built)
    assert roster.student_ids == ["S001", "S002", "S003"]
    assert roster.names == ["Barack Obama", "Joe Biden", "S003"]
    assert roster.owners.tolist() == [0, 0, 1, 1, 2, 2]
    assert json.loads(built.read_text())["v"] == 1
    assert roster.embedder == "sface/sface-2021dec-int8bq"


def test_roster_build_fails_when_nobody_enrolled(runner: CliRunner, env: None, tmp_path: Path,
                                                 faces_dir: Path) -> None:
    photos = tmp_path / "photos"
    _link(photos / "S001.jpg", faces_dir / "face_recognition/examples/two_people.jpg")
    out = tmp_path / "roster.json"
    result = runner.invoke(app, ["roster", "build", str(photos), "-o", str(out)])
    assert result.exit_code == 1
    assert "no student could be enrolled" in result.output
    assert not out.exists()


def _identify(runner: CliRunner, roster: Path, *images: Path) -> list[dict]:
    result = runner.invoke(app, ["identify", *map(str, images), "--roster", str(roster), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_identify_same_people_in_other_photos(runner: CliRunner, env: None, built: Path,
                                              faces_dir: Path) -> None:
    ex = faces_dir / "face_recognition/examples"
    test = ex / "knn_examples/test"
    out = _identify(runner, built, test / "obama1.jpg", test / "johnsnow_test1.jpg",
                    test / "obama_and_biden.jpg")
    assert [f["student_id"] for f in out[0]["faces"]] == ["S001"]
    assert out[0]["faces"][0]["name"] == "Barack Obama"
    assert out[0]["faces"][0]["distance"] < THRESHOLD
    assert [f["student_id"] for f in out[1]["faces"]] == ["S003"]  # Kit Harington as Jon Snow
    # and the girl in the corner, whom YuNet finds (not enrolled)
    assert sorted(f["student_id"] for f in out[2]["faces"]) == ["S001", "S002", "unknown"]
    for face in out[2]["faces"]:
        x1, y1, x2, y2 = face["box"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2


def test_identify_unenrolled_people_are_unknown(runner: CliRunner, env: None, built: Path,
                                                faces_dir: Path) -> None:
    test = faces_dir / "face_recognition/examples/knn_examples/test"
    # Alex Lacamoire and Rose Leslie are not in this roster; Kit is, next to Rose
    out = _identify(runner, built, test / "alex_lacamoire1.jpg", test / "kit_with_rose.jpg")
    assert [f["student_id"] for f in out[0]["faces"]] == ["unknown"]
    assert out[0]["faces"][0]["distance"] > THRESHOLD
    ids = sorted(f["student_id"] for f in out[1]["faces"])
    assert ids == ["S003", "unknown"]


def test_identify_text_output_and_bad_image(runner: CliRunner, env: None, built: Path,
                                            tmp_path: Path, faces_dir: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"xx")
    good = faces_dir / "face_recognition/examples/obama2.jpg"
    result = runner.invoke(app, ["identify", str(good), str(bad), "--roster", str(built)])
    assert result.exit_code == 1
    assert "S001" in result.output and "1 face(s)" in result.output
    assert "bad.jpg: error" in result.output
    missing = runner.invoke(app, ["identify", str(good), "--roster", str(tmp_path / "no.json")])
    assert missing.exit_code == 1 and "cannot read roster" in missing.output


def test_identify_refuses_a_roster_of_another_embedder(runner: CliRunner, env: None,
                                                       built: Path, tmp_path: Path,
                                                       faces_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """An sface roster on a dlib device (and a legacy roster, which is dlib's, on an sface
    one): refused with the reason and the fix, never matched across descriptor spaces."""
    good = faces_dir / "face_recognition/examples/obama2.jpg"
    monkeypatch.setenv("APPLIANCE_RECOGNITION__EMBEDDER", "dlib")
    result = runner.invoke(app, ["identify", str(good), "--roster", str(built)])
    assert result.exit_code == 1
    assert "made by the sface/sface-2021dec-int8bq embedder but this device runs " \
           "dlib/dlib-resnet-v1" in result.output
    assert 'recognition.embedder = "sface"' in result.output
    monkeypatch.delenv("APPLIANCE_RECOGNITION__EMBEDDER")
    legacy = json.loads(built.read_text())
    del legacy["embedder"]  # a roster.json written before the embedder was recorded
    old = tmp_path / "legacy.json"
    old.write_text(json.dumps(legacy))
    result = runner.invoke(app, ["identify", str(good), "--roster", str(old)])
    assert result.exit_code == 1
    assert "made by the dlib/dlib-resnet-v1 embedder" in result.output


def test_roster_build_from_an_enrolment_video(runner: CliRunner, env: None, tmp_path: Path,
                                              faces_dir: Path) -> None:
    """S001.mp4: the best, most varied frames become S001's descriptors (5 of them), and S001
    is recognised in a photo that is not in the clip."""
    train = faces_dir / "face_recognition/examples/knn_examples/train"
    photos = tmp_path / "photos"
    photos.mkdir()
    enrolment_clip(photos / "S001.mp4", sorted((train / "obama").iterdir()))
    _link(photos / "S002" / "biden.jpg", sorted((train / "biden").iterdir())[0])
    out = tmp_path / "roster.json"
    result = runner.invoke(app, ["roster", "build", str(photos), "-o", str(out)])
    assert result.exit_code == 0, result.output
    roster = Roster.load(out)
    assert roster.student_ids == ["S001", "S002"]
    assert roster.owners.tolist().count(0) == 5  # five frames of the clip
    assert "S002" in result.output.split("recommended):")[1]  # one photo: under 3
    vectors = roster.embeddings[roster.owners == 0]
    sims = vectors @ vectors.T
    assert sims[np.triu_indices(5, 1)].max() < 0.999  # different frames, not one copied
    test = faces_dir / "face_recognition/examples/knn_examples/test"
    found = _identify(runner, out, test / "obama1.jpg")
    assert [f["student_id"] for f in found[0]["faces"]] == ["S001"]
