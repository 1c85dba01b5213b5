"""Capture: real video files and real sockets; reopen with backoff, newest-frame hand-over."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import metrics
from appliance.capture import (
    CaptureWorker,
    OpenCVCameraSource,
    Picamera2Source,
    SourceError,
    VideoFileSource,
    make_source,
)


@pytest.fixture(scope="module")
def clip(faces_dir: Path) -> Path:
    return faces_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_make_source_parses_specs(tmp_path: Path) -> None:
    assert isinstance(make_source("picamera2"), Picamera2Source)
    cam = make_source("0")
    assert isinstance(cam, OpenCVCameraSource) and cam.live and not cam.is_stream
    assert isinstance(make_source("/dev/video2"), OpenCVCameraSource)
    url = make_source("rtsp://admin:secret@10.1.2.3:554/stream1")
    assert isinstance(url, OpenCVCameraSource) and url.is_stream
    assert "secret" not in url.description
    video = make_source(str(tmp_path / "a.mp4"))
    assert isinstance(video, VideoFileSource) and not video.live
    assert isinstance(make_source(f"file://{tmp_path}/a.mp4"), VideoFileSource)


def test_picamera2_missing_is_a_source_error() -> None:
    try:
        import picamera2  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(SourceError, match="picamera2"):
            Picamera2Source().open()
    else:
        pytest.skip("picamera2 is installed here")


def test_file_source_reads_every_frame(clip: Path) -> None:
    worker = CaptureWorker(VideoFileSource(clip), every_frame=True, paced=False)
    worker.start()
    frames = []
    while not worker.finished:
        frame = worker.get(timeout=2)
        if frame is not None:
            frames.append(frame)
    worker.stop()
    assert len(frames) == 275
    assert [f.index for f in frames] == list(range(275))
    assert frames[0].image.shape == (360, 640, 3)
    assert frames[-1].pts_s == pytest.approx(274 / 29.97, rel=1e-3)
    # replayed as fast as possible: captured_at follows the video's time line
    span = (frames[-1].captured_at - frames[0].captured_at).total_seconds()
    assert span == pytest.approx(frames[-1].pts_s, abs=1e-3)
    assert worker.state == "ended" and not worker.is_alive()


def test_paced_file_runs_at_its_rate(clip: Path) -> None:
    worker = CaptureWorker(VideoFileSource(clip), every_frame=True, paced=True)
    worker.start()
    first = worker.get(timeout=5)
    assert first is not None
    t0 = time.monotonic()
    for _ in range(30):
        assert worker.get(timeout=5) is not None
    elapsed = time.monotonic() - t0
    worker.stop()
    assert 0.8 < elapsed < 3.0  # 30 frames at 29.97 fps: about a second


def test_newest_frame_only_counts_drops(clip: Path) -> None:
    before = metrics.FRAMES_DROPPED._value.get()
    worker = CaptureWorker(VideoFileSource(clip), every_frame=False, paced=False, loop=True)
    worker.start()
    got = []
    for _ in range(5):
        time.sleep(0.1)  # a slow consumer
        frame = worker.get(timeout=5)
        assert frame is not None
        got.append(frame.index)
    worker.stop()
    assert got == sorted(got) and got[-1] - got[0] > 5  # frames skipped, never stale
    assert worker.dropped > 0
    assert metrics.FRAMES_DROPPED._value.get() - before == worker.dropped


def test_file_that_disappears_and_reappears(clip: Path, tmp_path: Path) -> None:
    path = tmp_path / "camera.mp4"
    worker = CaptureWorker(VideoFileSource(path), every_frame=False, paced=False, loop=True,
                           backoff_initial_s=0.05, backoff_max_s=0.2)
    worker.start()
    try:
        assert wait_for(lambda: worker.state == "failed")  # never opened yet
        assert "does not exist" in (worker.last_error or "")
        shutil.copy(clip, path)
        assert wait_for(lambda: worker.state == "ok")
        assert worker.get(timeout=5) is not None
        path.unlink()  # gone: the next loop's reopen fails
        assert wait_for(lambda: worker.state == "reopening")
        assert metrics.CAMERA_UP._value.get() == 0
        n = worker.frames_read
        time.sleep(0.3)
        assert worker.frames_read == n and worker.is_alive()
        shutil.copy(clip, path)
        assert wait_for(lambda: worker.state == "ok" and worker.frames_read > n)
        assert worker.get(timeout=5) is not None
        assert metrics.CAMERA_UP._value.get() == 1
    finally:
        worker.stop()
    assert not worker.is_alive()


def test_unreadable_file_keeps_retrying(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"\x00not a video\x00" * 100)
    worker = CaptureWorker(VideoFileSource(path), backoff_initial_s=0.05, backoff_max_s=0.1)
    worker.start()
    assert wait_for(lambda: worker.state == "failed")
    assert wait_for(lambda: worker._failures >= 3)
    assert worker.is_alive() and worker.get(timeout=0.1) is None
    worker.stop()
    assert not worker.is_alive()


def test_backoff_is_exponential_and_capped() -> None:
    worker = CaptureWorker(VideoFileSource("/nonexistent.mp4"), backoff_initial_s=0.5,
                           backoff_max_s=3)
    assert [worker._backoff(n) for n in range(1, 7)] == [0.5, 1, 2, 3, 3, 3]


def test_unreachable_rtsp_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a local port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    source = OpenCVCameraSource(f"rtsp://user:pw@127.0.0.1:{port}/stream")
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="cannot open"):
        source.open()
    assert time.monotonic() - t0 < 5
    worker = CaptureWorker(source, backoff_initial_s=0.05, backoff_max_s=0.2)
    worker.start()
    assert wait_for(lambda: worker.state == "failed" and worker._failures >= 2, timeout=10)
    assert "pw" not in (worker.last_error or "")
    t0 = time.monotonic()
    worker.stop()
    assert time.monotonic() - t0 < 3 and not worker.is_alive()


def damaged_copies(clip: Path, tmp_path: Path) -> dict[str, Path]:
    """The clip cut in half (no index at the end), with bytes overwritten from 2 kB on, and a
    text file named .mp4: what `appliance replay` gets handed by mistake."""
    data = clip.read_bytes()
    out = {"truncated": tmp_path / "truncated.mp4", "corrupt": tmp_path / "corrupt.mp4",
           "text": tmp_path / "notes.mp4"}
    out["truncated"].write_bytes(data[: len(data) // 3])
    damaged = bytearray(data)
    for i in range(2000, len(damaged), 997):
        damaged[i] = (damaged[i] * 7 + 13) % 256
    out["corrupt"].write_bytes(bytes(damaged))
    out["text"].write_text("lesson notes, not a video\n" * 50)
    return out


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "text"])
def test_fail_fast_ends_on_a_damaged_file(clip: Path, tmp_path: Path, kind: str) -> None:
    path = damaged_copies(clip, tmp_path)[kind]
    worker = CaptureWorker(VideoFileSource(path), every_frame=True, paced=False, loop=False,
                           backoff_initial_s=0.05, backoff_max_s=0.1, fail_fast=True)
    worker.start()
    frames = 0
    deadline = time.monotonic() + 30
    while not worker.finished and time.monotonic() < deadline:
        if worker.get(timeout=0.1) is not None:
            frames += 1
    assert worker.finished and worker.state == "failed"
    assert wait_for(lambda: not worker.is_alive(), 5)  # the thread ended: no reopen loop
    assert worker.fatal_error and str(path) in worker.fatal_error
    expected = {"truncated": "not a readable video", "text": "not a readable video",
                "corrupt": "decoding stopped at frame"}[kind]
    assert expected in worker.fatal_error
    assert frames < 275


def test_fail_fast_still_reopens_a_live_camera(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = CaptureWorker(OpenCVCameraSource(f"rtsp://127.0.0.1:{port}/stream"),
                           backoff_initial_s=0.05, backoff_max_s=0.1, fail_fast=True)
    worker.start()
    try:
        assert wait_for(lambda: worker._failures >= 3, timeout=20)
        assert worker.is_alive() and worker.fatal_error is None and not worker.finished
    finally:
        worker.stop()


def test_missing_camera_logs_once_with_a_hint(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """No camera: one warning that says to set camera.source, not a line (and an OpenCV
    warning on stderr) at every retry."""
    import logging

    from appliance.capture.opencv import v4l2_device

    caplog.set_level(logging.INFO)
    assert v4l2_device("/dev/video99") == 99 and v4l2_device("2") == 2
    worker = CaptureWorker(OpenCVCameraSource("/dev/video99"), backoff_initial_s=0.02,
                           backoff_max_s=0.05)
    worker.start()
    try:
        assert wait_for(lambda: worker._failures >= 15, timeout=20)
    finally:
        worker.stop()
    lines = [r for r in caplog.records if r.name.startswith("appliance.capture")
             and r.levelno >= logging.INFO]
    assert len(lines) <= 3, [r.getMessage() for r in lines]
    assert any("camera.source" in r.getMessage() for r in lines)
    assert "[ WARN" not in capfd.readouterr().err
