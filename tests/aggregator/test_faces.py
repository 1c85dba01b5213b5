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
from cloud_sync.protocol import ScheduleResponse
from tests.aggregator.conftest import World


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
        sched = client.get("/api/v1/schedule",
                           params={"room_id": "LAB-301", "at": world.at(0, 9, 30).isoformat()},
                           headers=world.device)
        roster = {e.student_id: np.asarray(e.embeddings[0])
                  for e in ScheduleResponse.model_validate(sched.json()).rosters["CS101"]}
        assert set(roster) == {"S001", "S002", "S003"}
        assert np.linalg.norm(roster["S001"] - roster["S002"]) < 0.5  # same person
        assert np.linalg.norm(roster["S001"] - roster["S003"]) > 0.6  # Obama vs Biden
        assert client.get("/api/v1/students/S001/faces", headers=world.admin).json()[0][
            "source"] == "upload:obama.jpg"
    assert not (tmp_path / "agg" / "photos").exists()  # photos discarded by default

    # The same numbers as the device's own enrollment code.
    import cv2

    from appliance.vision.embedder import FaceEmbedder
    from appliance.vision.enroll import embed_photo, enrollment_detector

    image = cv2.imdecode(np.frombuffer(_photo(faces_dir, "obama.jpg"), np.uint8),
                         cv2.IMREAD_COLOR)
    device = embed_photo(image, enrollment_detector(model_dir), FaceEmbedder(model_dir), 40)
    assert device.embedding is not None
    assert np.allclose(device.embedding, roster["S001"], atol=1e-6)


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
