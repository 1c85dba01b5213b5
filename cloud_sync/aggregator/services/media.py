"""ffprobe/ffmpeg (Debian's package) for recorded sessions: the upload check, the browser copy
(H.264/AAC MP4 with the index at the front) and its poster frame.

ffmpeg runs as a child process with a time limit; its progress (``-progress pipe:1``) drives the
job's progress, and a cancelled job terminates it.

Untrusted files: ffprobe and ffmpeg open only the containers we take (``-format_whitelist``:
MP4/MOV, Matroska/WebM; an uploaded HLS, DASH, concat or SDP playlist is refused without being
parsed) from local files only (``-protocol_whitelist file``), each under an address-space limit
(``prlimit --as``, ``recording_ffmpeg_memory_mb``); the check refuses frames larger than 4096
px a side, ``MAX_PIXELS`` or ``MAX_PIXEL_RATE`` before anything decodes more than the probe; and
no message shown to an uploader carries a server path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud_sync.aggregator.services.common import ServiceError, UnavailableError

_LOGGER = logging.getLogger(__name__)
CONTAINERS = {"mp4", "mov", "matroska", "webm"}  # ffprobe's format_name parts we accept
# the demuxers ffprobe/ffmpeg may use on an upload (libavformat names): nothing else is probed
FORMAT_WHITELIST = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm"
SUFFIXES = (".mp4", ".mkv", ".mov")
PROBE_TIMEOUT_S = 60.0
MAX_SIDE = 4096  # px: DCI 4K
MAX_PIXELS = 4096 * 2304  # a frame
MAX_PIXEL_RATE = 3840 * 2160 * 60  # pixels a second: 4K at 60 fps
MEMORY_MB = 3072  # default address-space limit of an ffprobe/ffmpeg child (prlimit --as)
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


def _limited(cmd: list[str], memory_mb: int) -> list[str]:
    """``cmd`` under an address-space limit of ``memory_mb`` (util-linux ``prlimit``; without
    it the command runs unlimited, with a warning)."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        _LOGGER.warning("prlimit (util-linux) not found: ffmpeg runs without a memory limit")
        return cmd
    return [prlimit, f"--as={memory_mb * 1024 * 1024}", "--", *cmd]


def _env() -> dict[str, str]:
    # glibc's per-thread malloc arenas reserve 64 MiB of address space each: with many
    # threads they, not the frames, would meet the limit
    return {**os.environ, "MALLOC_ARENA_MAX": "2"}


def _input(path: Path) -> list[str]:
    """ffmpeg's input options for an uploaded file: our containers, from a local file."""
    return ["-protocol_whitelist", "file", "-format_whitelist", FORMAT_WHITELIST,
            "-i", str(path)]


_ABSOLUTE = re.compile(r"(?<![\w.~:/-])/(?:[^\s/:'\"]+/)+([^\s/:'\"]*)")


def clean(text: str) -> str:
    """``text`` without server paths: an absolute path becomes its last part (the uploader
    never learns where recordings live)."""
    return _ABSOLUTE.sub(lambda m: m.group(1) or "<path>", text)


def _stderr_line(raw: bytes, last: bool = True) -> str | None:
    lines = [line for line in raw.decode(errors="replace").strip().splitlines() if line]
    if not lines:
        return None
    return clean(lines[-1] if last else lines[0])[:300]


def _rate(text: str | None) -> float | None:
    try:
        num, _, den = (text or "").partition("/")
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return value if 0 < value < 1000 else None


def probe(path: Path, memory_mb: int = MEMORY_MB, containers: bool = True) -> Probe:
    """What the file is (container, duration, first video stream); MediaError when ffprobe
    cannot read it. ``containers``: only MP4/MOV/Matroska (uploads of recordings); False for
    an enrolment video (any container OpenCV reads; only the frame size is wanted)."""
    cmd = [_tool("ffprobe"), "-v", "error", "-print_format", "json", "-show_format",
           "-show_streams", "-protocol_whitelist", "file"]
    if containers:
        cmd += ["-format_whitelist", FORMAT_WHITELIST]
    cmd.append(str(path))
    try:
        done = subprocess.run(_limited(cmd, memory_mb), capture_output=True, env=_env(),
                              timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise MediaError("the file could not be read in time (ffprobe timed out)") from err
    if done.returncode != 0:
        why = _stderr_line(done.stderr)
        if b"not on whitelist" in done.stderr:
            why = "not an MP4, MOV or MKV file"
        raise MediaError("not a readable video: " + (why or "ffprobe failed"))
    info = json.loads(done.stdout or b"{}")
    fmt = info.get("format", {})
    names = set(str(fmt.get("format_name", "")).split(","))
    if containers and not names & CONTAINERS:
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
        container=sorted(names & CONTAINERS or names)[0], duration_s=duration,
        width=int(video.get("width") or 0), height=int(video.get("height") or 0),
        fps=_rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate")),
        video_codec=str(video.get("codec_name", "?"))[:32],
        has_audio=audio is not None, pix_fmt=str(video.get("pix_fmt", "?")),
        audio_codec=None if audio is None else str(audio.get("codec_name", "?")),
    )


def check_frames(found: Probe) -> None:
    """MediaError when the frames are larger than MAX_SIDE a side or MAX_PIXELS, or come
    faster than MAX_PIXEL_RATE pixels a second (a 750 KB file of 16000x16000 PNG frames made
    the job use 3 GB and its transcode 6.6 GB)."""
    if found.width <= 0 or found.height <= 0:
        raise MediaError("the video stream has no frame size")
    size = f"{found.width}x{found.height}"
    if max(found.width, found.height) > MAX_SIDE or found.width * found.height > MAX_PIXELS:
        raise MediaError(f"frames of {size} pixels: at most {MAX_SIDE} px a side and "
                         f"{MAX_PIXELS} pixels (4K) are taken")
    rate = found.width * found.height * (found.fps or 0.0)
    if rate > MAX_PIXEL_RATE:
        raise MediaError(f"{size} at {found.fps:g} fps is {rate / 1e6:.0f} Mpx/s: at most "
                         f"{MAX_PIXEL_RATE / 1e6:.0f} Mpx/s (4K at 60 fps) are taken")


def check(path: Path, min_duration_s: float, max_duration_s: float,
          memory_mb: int = MEMORY_MB) -> Probe:
    """The upload check: the file is a video container we take, its frames are not larger
    than 4K (nor faster), its duration is sane, and its first seconds decode without error.
    MediaError says what failed."""
    found = probe(path, memory_mb)
    check_frames(found)
    if not min_duration_s <= found.duration_s <= max_duration_s:
        raise MediaError(f"duration {found.duration_s:.1f} s is outside {min_duration_s:g}.."
                         f"{max_duration_s:g} s")
    cmd = [_tool("ffmpeg"), "-nostdin", "-v", "error", "-xerror", "-t", str(DECODE_CHECK_S),
           *_input(path), "-map", "0:v:0", "-f", "null", "-"]
    try:
        done = subprocess.run(_limited(cmd, memory_mb), capture_output=True, env=_env(),
                              timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise MediaError("the video could not be decoded in time") from err
    if done.returncode != 0 or done.stderr.strip():
        raise MediaError("the video does not decode: " + (
            _stderr_line(done.stderr, last=False) or f"ffmpeg exit {done.returncode}"))
    return found


def transcode(src: Path, dst: Path, found: Probe, progress: Callable[[float], bool],
              timeout_s: float, memory_mb: int = MEMORY_MB) -> str:
    """``src`` -> ``dst``: H.264 (yuv420p, even size) + AAC, faststart MP4, for browsers; a
    file that already is H.264/AAC is only remuxed (seconds instead of minutes). Returns
    "remux" or "transcode". ``progress(fraction)`` is called as ffmpeg reports; it returns
    False to stop (cancel): then ffmpeg is terminated and InterruptedError raised. MediaError
    if ffmpeg fails."""
    tmp = dst.with_suffix(".part.mp4")
    cmd = [_tool("ffmpeg"), "-nostdin", "-y", "-v", "error", *_input(src), "-map", "0:v:0"]
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
    proc = subprocess.Popen(_limited(cmd, memory_mb), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
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
        raise MediaError("transcoding failed: " + (_stderr_line(err)
                                                   or f"ffmpeg exit {proc.returncode}"))
    tmp.replace(dst)
    return how


def poster(src: Path, dst: Path, duration_s: float, memory_mb: int = MEMORY_MB) -> None:
    """One JPEG frame (a second in, or the middle of a short clip), POSTER_WIDTH wide."""
    at = min(1.0, duration_s / 2)
    cmd = [_tool("ffmpeg"), "-nostdin", "-y", "-v", "error", "-ss", f"{at:.3f}", *_input(src),
           "-frames:v", "1", "-vf", f"scale={POSTER_WIDTH}:-2", "-q:v", "4", str(dst)]
    done = subprocess.run(_limited(cmd, memory_mb), capture_output=True, env=_env(),
                          timeout=PROBE_TIMEOUT_S, check=False)
    if done.returncode != 0 or not dst.is_file():
        raise MediaError("no poster frame: " + (_stderr_line(done.stderr) or "ffmpeg failed"))
