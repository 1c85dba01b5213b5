"""ffprobe/ffmpeg (Debian's package) for recorded sessions: the upload check, the browser copy
(H.264/AAC MP4 with the index at the front) and its poster frame.

ffmpeg runs as a child process with a time limit; its progress (``-progress pipe:1``) drives the
job's progress, and a cancelled job terminates it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud_sync.aggregator.services.common import ServiceError, UnavailableError

_LOGGER = logging.getLogger(__name__)
CONTAINERS = {"mp4", "mov", "matroska", "webm"}  # ffprobe's format_name parts we accept
SUFFIXES = (".mp4", ".mkv", ".mov")
PROBE_TIMEOUT_S = 60.0
DECODE_CHECK_S = 2.0  # seconds of video decoded by the upload check
TRANSCODE_CRF = "26"
POSTER_WIDTH = 640


class MediaError(ServiceError):
    """A file ffmpeg cannot use: the message says what is wrong with it."""

    status = 422


@dataclass(frozen=True)
class Probe:
    container: str
    duration_s: float
    width: int
    height: int
    fps: float | None
    video_codec: str
    has_audio: bool
    pix_fmt: str = "?"
    audio_codec: str | None = None

    @property
    def browser_ready(self) -> bool:
        """H.264 4:2:0 video and AAC or no audio: a browser plays it after a remux (a copy of
        the streams into an MP4 with its index first), no re-encoding needed."""
        return (self.video_codec == "h264" and self.pix_fmt in ("yuv420p", "yuvj420p")
                and self.audio_codec in (None, "aac"))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UnavailableError(f"{name} is not installed on this server (Debian: apt-get "
                               "install ffmpeg)")
    return path


def _rate(text: str | None) -> float | None:
    try:
        num, _, den = (text or "").partition("/")
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return value if 0 < value < 1000 else None


def probe(path: Path) -> Probe:
    """What the file is (container, duration, first video stream); MediaError when ffprobe
    cannot read it."""
    cmd = [_tool("ffprobe"), "-v", "error", "-print_format", "json", "-show_format",
           "-show_streams", str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise MediaError("the file could not be read in time (ffprobe timed out)") from err
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        raise MediaError("not a readable video: " + (why[-1] if why else "ffprobe failed"))
    info = json.loads(done.stdout or b"{}")
    fmt = info.get("format", {})
    names = set(str(fmt.get("format_name", "")).split(","))
    if not names & CONTAINERS:
        raise MediaError(f"container {fmt.get('format_name')!r} is not MP4, MOV or MKV")
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not (s.get("disposition") or {}).get("attached_pic")), None)
    if video is None:
        raise MediaError("the file has no video stream")
    try:
        duration = float(fmt.get("duration") or video.get("duration") or 0.0)
    except ValueError:
        duration = 0.0
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    return Probe(
        container=sorted(names & CONTAINERS)[0], duration_s=duration,
        width=int(video.get("width") or 0), height=int(video.get("height") or 0),
        fps=_rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate")),
        video_codec=str(video.get("codec_name", "?"))[:32],
        has_audio=audio is not None, pix_fmt=str(video.get("pix_fmt", "?")),
        audio_codec=None if audio is None else str(audio.get("codec_name", "?")),
    )


def check(path: Path, min_duration_s: float, max_duration_s: float) -> Probe:
    """The upload check: the file is a video container we take, its duration is sane, and its
    first seconds decode without error. MediaError says what failed."""
    found = probe(path)
    if found.width <= 0 or found.height <= 0:
        raise MediaError("the video stream has no frame size")
    if not min_duration_s <= found.duration_s <= max_duration_s:
        raise MediaError(f"duration {found.duration_s:.1f} s is outside {min_duration_s:g}.."
                         f"{max_duration_s:g} s")
    cmd = [_tool("ffmpeg"), "-nostdin", "-v", "error", "-xerror", "-t", str(DECODE_CHECK_S),
           "-i", str(path), "-map", "0:v:0", "-f", "null", "-"]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise MediaError("the video could not be decoded in time") from err
    errors = done.stderr.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or errors:
        raise MediaError("the video does not decode: " + (errors[0] if errors
                                                          else f"ffmpeg exit {done.returncode}"))
    return found


def transcode(src: Path, dst: Path, found: Probe, progress: Callable[[float], bool],
              timeout_s: float) -> str:
    """``src`` -> ``dst``: H.264 (yuv420p, even size) + AAC, faststart MP4, for browsers; a
    file that already is H.264/AAC is only remuxed (seconds instead of minutes). Returns
    "remux" or "transcode". ``progress(fraction)`` is called as ffmpeg reports; it returns
    False to stop (cancel): then ffmpeg is terminated and InterruptedError raised. MediaError
    if ffmpeg fails."""
    tmp = dst.with_suffix(".part.mp4")
    cmd = [_tool("ffmpeg"), "-nostdin", "-y", "-v", "error", "-i", str(src), "-map", "0:v:0"]
    how = "remux" if found.browser_ready else "transcode"
    if how == "remux":
        cmd += ["-c:v", "copy"]
    else:
        cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", TRANSCODE_CRF,
                "-pix_fmt", "yuv420p", "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2"]
    cmd += ["-movflags", "+faststart", "-progress", "pipe:1", "-nostats"]
    if not found.has_audio:
        cmd.append("-an")
    else:
        cmd += ["-map", "0:a:0"] + (["-c:a", "copy"] if found.audio_codec == "aac"
                                    else ["-c:a", "aac", "-b:a", "96k"])
    duration_s = found.duration_s
    cmd.append(str(tmp))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stopped = False
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            key, _, value = raw.decode(errors="replace").strip().partition("=")
            if (key == "out_time_us" and value.isdigit() and duration_s > 0
                    and not progress(min(1.0, int(value) / 1e6 / duration_s))):
                stopped = True
                proc.terminate()
                break
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        tmp.unlink(missing_ok=True)
        raise MediaError(f"transcoding took longer than {timeout_s:.0f} s") from exc
    if stopped:
        tmp.unlink(missing_ok=True)
        raise InterruptedError("transcoding stopped")
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = err.decode(errors="replace").strip().splitlines()
        raise MediaError("transcoding failed: " + (lines[-1] if lines
                                                   else f"ffmpeg exit {proc.returncode}"))
    tmp.replace(dst)
    return how


def poster(src: Path, dst: Path, duration_s: float) -> None:
    """One JPEG frame (a second in, or the middle of a short clip), POSTER_WIDTH wide."""
    at = min(1.0, duration_s / 2)
    cmd = [_tool("ffmpeg"), "-nostdin", "-y", "-v", "error", "-ss", f"{at:.3f}", "-i", str(src),
           "-frames:v", "1", "-vf", f"scale={POSTER_WIDTH}:-2", "-q:v", "4", str(dst)]
    done = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    if done.returncode != 0 or not dst.is_file():
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise MediaError("no poster frame: " + (lines[-1] if lines else "ffmpeg failed"))
