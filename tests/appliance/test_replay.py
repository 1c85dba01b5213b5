"""`appliance replay` on real clips: Lin-Manuel Miranda recognised once; strangers never."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load
from appliance.replay import replay_video
from appliance.store import Store
from tests.appliance.test_pipeline import hamilton, roster_file  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_hamilton_clip_records_lin_once(hamilton: Path, roster_file: Path,  # noqa: F811
                                        model_dir: Path, tmp_path: Path) -> None:
    settings = load(None, paths={"data_dir": tmp_path, "model_dir": model_dir})
    db = tmp_path / "replay.db"
    report = replay_video(settings, hamilton, roster_file, store_path=db)
    assert report["frames"] == 275
    lin = [r for r in report["records"] if r["student_id"] == "S001"]
    # the clip (9 s) is inside one 30 s debounce window: exactly one record
    assert len(lin) == 1
    assert lin[0]["name"] == "Lin-Manuel Miranda"
    assert 0 <= lin[0]["first_seen_s"] <= 9.2
    assert 0 < lin[0]["confidence"] <= 1
    assert lin[0]["distance"] < settings.recognition.match_threshold()
    stored = Store(db).unsent_records(100)
    assert [r.student_id for r in stored] == [r["student_id"] for r in report["records"]]
    assert stored[0].room_id == settings.device.room_id and stored[0].boot_id


@pytest.mark.slow
def test_strangers_clip_records_nobody(faces_dir: Path, roster_file: Path,  # noqa: F811
                                       model_dir: Path, tmp_path: Path) -> None:
    clip = faces_dir / "walking" / "strangers_walking_1080p.mp4"
    settings = load(None, paths={"data_dir": tmp_path, "model_dir": model_dir})
    report = replay_video(settings, clip, roster_file)
    assert report["frames"] > 100
    assert report["tracks"] >= 2 and report["embeddings"] > 0  # faces were looked at
    assert report["records"] == []


@pytest.mark.slow
def test_replay_cli_json(hamilton: Path, roster_file: Path, model_dir: Path,  # noqa: F811
                         tmp_path: Path) -> None:
    env = {**os.environ, "APPLIANCE_PATHS__MODEL_DIR": str(model_dir),
           "APPLIANCE_PATHS__DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "replay", str(hamilton), "--roster",
         str(roster_file), "--json", "--store", str(tmp_path / "kept.db")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=240, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("frames", "seconds", "fps", "stage_ms", "records", "unknown_tracks",
                "peak_rss_mb"):
        assert key in report
    assert set(report["stage_ms"]) == {"decode", "detect", "track", "embed", "match"}
    assert [r["student_id"] for r in report["records"]] == ["S001"]
    assert 0 < report["peak_rss_mb"] < 1000
    assert len(Store(tmp_path / "kept.db").unsent_records(10)) == 1
    missing = subprocess.run(
        [sys.executable, "-m", "appliance", "replay", str(tmp_path / "none.mp4"), "--json"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.slow
def test_replay_cli_refuses_damaged_files(hamilton: Path, model_dir: Path,  # noqa: F811
                                          tmp_path: Path) -> None:
    """A truncated, corrupt or non-video file: one clear line and exit 1, not a reopen loop."""
    from tests.appliance.capture.test_capture import damaged_copies

    env = {**os.environ, "APPLIANCE_PATHS__MODEL_DIR": str(model_dir),
           "APPLIANCE_PATHS__DATA_DIR": str(tmp_path)}
    expected = {"truncated": "is not a readable video (not a video, or truncated or damaged",
                "text": "is not a readable video", "corrupt": "decoding stopped at frame"}
    for kind, path in damaged_copies(hamilton, tmp_path).items():
        out = subprocess.run([sys.executable, "-m", "appliance", "replay", str(path)],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
                             check=False)
        assert out.returncode == 1, (kind, out.stdout[-500:], out.stderr[-500:])
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: video file {path}") and expected[kind] in last, last
        assert "Traceback" not in out.stderr + out.stdout
