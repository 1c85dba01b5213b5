"""Server-side enrollment with the device's code, on real photos from the shared face set."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.cli import app as cli
from cloud_sync.protocol import EMBEDDER_IDS, ScheduleResponse
from tests.cloud_sync.aggregator.conftest import World


def _photo(faces_dir: Path, name: str) -> bytes:
    return (faces_dir / "face_recognition" / "examples" / name).read_bytes()


def _enrol(client: TestClient, admin: dict, student: str, data: bytes, name: str) -> Any:
    return client.post(f"/api/v1/students/{student}/faces", headers=admin,
                       files={"photo": (name, data, "image/jpeg")})


def test_enroll_real_photos(world: World, faces_dir: Path, model_dir: Path, settings: Any,
                            tmp_path: Path) -> None:
    configured = aggregator_config.load(None, database_url=settings.database_url,
                                        model_dir=model_dir, data_dir=tmp_path / "agg")
    with TestClient(create_app(configured)) as client:
        ok = _enrol(client, world.admin, "S001", _photo(faces_dir, "obama.jpg"), "obama.jpg")
        assert ok.status_code == 201, ok.text
        assert ok.json()["quality"] > 0 and ok.json()["photo_kept"] is False
        same = _enrol(client, world.admin, "S002", _photo(faces_dir, "obama2.jpg"), "o2.jpg")
        other = _enrol(client, world.admin, "S003", _photo(faces_dir, "biden.jpg"), "b.jpg")
        assert same.status_code == 201 and other.status_code == 201
        two = _enrol(client, world.admin, "S004", _photo(faces_dir, "two_people.jpg"), "t.jpg")
        assert two.status_code == 422 and "2 faces" in two.json()["detail"]
        assert _enrol(client, world.admin, "S004", b"\x89PNG broken", "x.png").status_code == 400
        rosters = {}
        for name in ("sface", "dlib"):
            sched = client.get("/api/v1/schedule",
                               params={"room_id": "LAB-301", "embedder": name,
                                       "at": world.at(0, 9, 30).isoformat()},
                               headers=world.device)
            parsed = ScheduleResponse.model_validate(sched.json())
            assert parsed.embedder == EMBEDDER_IDS[name]
            rosters[name] = {e.student_id: np.asarray(e.embeddings[0])
                             for e in parsed.rosters["CS101"]}
            assert set(rosters[name]) == {"S001", "S002", "S003"}
        sface, dlib = rosters["sface"], rosters["dlib"]
        assert np.linalg.norm(dlib["S001"] - dlib["S002"]) < 0.5  # same person
        assert np.linalg.norm(dlib["S001"] - dlib["S003"]) > 0.6  # Obama vs Biden
        assert float(sface["S001"] @ sface["S002"]) > 0.5  # cosine similarity, unit vectors
        assert float(sface["S001"] @ sface["S003"]) < 0.3
        listed = client.get("/api/v1/students/S001/faces", headers=world.admin).json()
        assert len(listed) == 1 and listed[0]["source"] == "upload:obama.jpg"
        assert listed[0]["embedders"] == [EMBEDDER_IDS["sface"], EMBEDDER_IDS["dlib"]]
    assert not (tmp_path / "agg" / "photos").exists()  # photos discarded by default

    # The same numbers as the device's own enrollment code, for each embedder.
    import cv2

    from appliance.vision.embedding import create_embedder
    from appliance.vision.enroll import embed_photo, enrollment_detector

    image = cv2.imdecode(np.frombuffer(_photo(faces_dir, "obama.jpg"), np.uint8),
                         cv2.IMREAD_COLOR)
    for name in ("sface", "dlib"):
        device = embed_photo(image, enrollment_detector(model_dir),
                             create_embedder(name, model_dir), 40)
        assert device.embedding is not None
        assert np.allclose(device.embedding, rosters[name]["S001"], atol=1e-5)


def test_reencode_migrates_dlib_only_enrolments(world: World, sessions: Any, faces_dir: Path,
                                                model_dir: Path, settings: Any, tmp_path: Path,
                                                monkeypatch: Any) -> None:
    """Photos enrolled before embedders were recorded (dlib rows only, as migration 0004 labels
    them): `aggregator faces reencode` adds the SFace descriptors from the kept photos, lists
    the students whose photos were not kept, and devices of both embedders get a roster."""
    from cloud_sync.aggregator.services.faces import store_embedding

    configured = aggregator_config.load(None, database_url=settings.database_url,
                                        model_dir=model_dir, data_dir=tmp_path / "agg",
                                        keep_photos=True, embedders=["dlib"])
    with TestClient(create_app(configured)) as client:  # a dlib-only aggregator, as before
        r = _enrol(client, world.admin, "S001", _photo(faces_dir, "obama.jpg"), "obama.jpg")
        assert r.status_code == 201 and r.json()["embedders"] == [EMBEDDER_IDS["dlib"]]
    with sessions() as session:  # a legacy row without a kept photo
        store_embedding(session, settings, "S002", np.full(128, 0.05, np.float32), 0.9, "old")
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", aggregator_config.database_url(settings))
    monkeypatch.setenv("AGGREGATOR_MODEL_DIR", str(model_dir))
    result = CliRunner().invoke(cli, ["faces", "reencode"])
    assert result.exit_code == 1, result.output  # S002 must be enrolled again
    assert "1 descriptors added; 1 students need new photos" in result.output
    assert "student S002: no sface/sface-2021dec-int8bq descriptor" in result.output
    listed = world.client.get("/api/v1/students/S001/faces", headers=world.admin).json()
    assert listed[0]["embedders"] == [EMBEDDER_IDS["dlib"], EMBEDDER_IDS["sface"]]
    sched = world.client.get("/api/v1/schedule", headers=world.device,
                             params={"room_id": "LAB-301", "embedder": "sface",
                                     "at": world.at(0, 9, 30).isoformat()})
    assert [e.student_id for e in ScheduleResponse.model_validate(sched.json())
            .rosters["CS101"]] == ["S001"]
    again = CliRunner().invoke(cli, ["faces", "reencode"])
    assert "0 descriptors added" in again.output  # idempotent
    # deleting the photo deletes every embedder's descriptor of it
    face_id = listed[0]["id"]
    assert world.client.delete(f"/api/v1/students/S001/faces/{face_id}",
                               headers=world.admin).status_code == 204
    assert world.client.get("/api/v1/students/S001/faces", headers=world.admin).json() == []
    sched = world.client.get("/api/v1/schedule", headers=world.device,
                             params={"room_id": "LAB-301", "embedder": "dlib",
                                     "at": world.at(0, 9, 30).isoformat()})
    assert "S001" not in [e.student_id for e in ScheduleResponse.model_validate(
        sched.json()).rosters["CS101"]]


def test_keep_photos_setting(world: World, faces_dir: Path, model_dir: Path, settings: Any,
                             tmp_path: Path) -> None:
    configured = aggregator_config.load(None, database_url=settings.database_url,
                                        model_dir=model_dir, data_dir=tmp_path / "agg",
                                        keep_photos=True)
    with TestClient(create_app(configured)) as client:
        r = _enrol(client, world.admin, "S001", _photo(faces_dir, "biden.jpg"), "biden.jpg")
        assert r.status_code == 201 and r.json()["photo_kept"] is True
        kept = list((tmp_path / "agg" / "photos" / "S001").iterdir())
        assert len(kept) == 1 and kept[0].read_bytes() == _photo(faces_dir, "biden.jpg")
        face_id = r.json()["id"]
        assert client.delete(f"/api/v1/students/S001/faces/{face_id}",
                             headers=world.admin).status_code == 204
        assert not kept[0].exists()


def test_cli_faces_encode_batch(world: World, faces_dir: Path, model_dir: Path,
                                settings: Any, tmp_path: Path, monkeypatch: Any) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(faces_dir / "face_recognition" / "examples" / "obama.jpg", photos / "S001.jpg")
    shutil.copy(faces_dir / "face_recognition" / "examples" / "two_people.jpg",
                photos / "S002.jpg")
    shutil.copy(faces_dir / "face_recognition" / "examples" / "biden.jpg", photos / "S999.jpg")
    (photos / "S001").mkdir()  # several photos of one student: a folder named by the id
    shutil.copy(faces_dir / "face_recognition" / "examples" / "obama2.jpg",
                photos / "S001" / "b.jpg")
    (photos / "notes.txt").write_text("ignored")
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", aggregator_config.database_url(settings))
    monkeypatch.setenv("AGGREGATOR_MODEL_DIR", str(model_dir))
    result = CliRunner().invoke(cli, ["faces", "encode", "--batch", str(photos)])
    assert result.exit_code == 1, result.output
    assert "2 of 4 photos enrolled" in result.output
    assert "2 faces" in result.output and "unknown student" in result.output
    r = world.client.get("/api/v1/students/S001/faces", headers=world.admin).json()
    assert sorted(f["source"] for f in r) == ["batch:S001.jpg", "batch:S001/b.jpg"]


def test_enrol_from_a_video(world: World, faces_dir: Path, model_dir: Path, settings: Any,
                            tmp_path: Path) -> None:
    """POST .../faces/video: five varied frames, each with both embedders' descriptors; a
    file that is not a video is a 422 with the reason."""
    from bench.montage import enrolment_clip

    train = faces_dir / "face_recognition/examples/knn_examples/train"
    clip = tmp_path / "obama.mp4"
    enrolment_clip(clip, sorted((train / "obama").iterdir()))
    configured = aggregator_config.load(None, database_url=settings.database_url,
                                        model_dir=model_dir, data_dir=tmp_path / "agg")
    with TestClient(create_app(configured)) as client:
        r = client.post("/api/v1/students/S001/faces/video", headers=world.admin,
                        files={"video": ("obama.mp4", clip.read_bytes(), "video/mp4")})
        assert r.status_code == 201, r.text
        rows = r.json()
        assert [f["source"] for f in rows] == [f"video:obama.mp4#{k}" for k in range(1, 6)]
        assert all(f["embedders"] == [EMBEDDER_IDS["sface"], EMBEDDER_IDS["dlib"]]
                   for f in rows)
        bad = client.post("/api/v1/students/S001/faces/video", headers=world.admin,
                          files={"video": ("x.mp4", b"not a video", "video/mp4")})
        assert bad.status_code == 422 and "video rejected" in bad.json()["detail"]
        sched = client.get("/api/v1/schedule", headers=world.device,
                           params={"room_id": "LAB-301", "at": world.at(0, 9, 30).isoformat()})
        (entry,) = ScheduleResponse.model_validate(sched.json()).rosters["CS101"]
        assert entry.student_id == "S001" and len(entry.embeddings) == 5
