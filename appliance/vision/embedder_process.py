"""The face embedder in a child process, so descriptors use another core than detection.

A descriptor costs 20x a detection (dlib: ~85 ms here, ~0.4 s on a Pi 4) and dlib holds the GIL
while it runs, so in a thread it would stall detection; in its own process it runs on another
core, and tracking keeps up with the camera while a face is being recognised. If the child dies
it is restarted; the descriptors it was computing are lost, never the pipeline.

:class:`EmbedderProcess` is the parent's side, :func:`_embedder_child` the child's main;
:class:`InProcessEmbedder` runs an embedder object given to the pipeline (tests, tools) in the
caller's process with the same interface.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from appliance.vision.detector import Detection
from appliance.vision.embedding import Embedder

_LOGGER = logging.getLogger(__name__)

EMBED_TIMEOUT_S = 30.0
EMBEDDER_START_TIMEOUT_S = 120.0


def _embedder_main(conn: Connection, model_dir: str, detector_model: str, name: str) -> None:
    """Child process: load the configured embedder's models, then answer (crop, box, keypoints)
    requests with (descriptor, ms, peak RSS MB) until it receives None or the pipe closes."""
    import resource

    from appliance.vision.embedding import create_embedder

    embedder = create_embedder(name, Path(model_dir), detector_model=detector_model)
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        crop, box, keypoints = request
        t0 = time.perf_counter()
        det = Detection(tuple(box), 1.0, keypoints)
        try:
            vector = embedder.embed(crop, [det])[0]
        except Exception as err:  # answer, so the parent is not left waiting
            conn.send(("error", str(err)))
            continue
        usage = resource.getrusage(resource.RUSAGE_SELF)
        conn.send((vector, (time.perf_counter() - t0) * 1e3,
                   (own_peak_rss_mb(usage.ru_maxrss / 1024.0),
                    usage.ru_utime + usage.ru_stime)))


def own_peak_rss_mb(fallback: float) -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss of a child started by (v)fork + exec
    also counts the parent's peak before the exec, which would double-count it."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return fallback


def _embedder_child(fd: int, model_dir: str, detector_model: str, name: str) -> None:
    """Entry point of the child (``python -c``): serve on the inherited socket ``fd``.
    Ctrl-C reaches the whole process group: the parent stops the child, so it ignores it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _embedder_main(Connection(fd), model_dir, detector_model, name)


_CHILD_CODE = (
    "import sys; from appliance.vision.embedder_process import _embedder_child; "
    "_embedder_child(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])"
)


class EmbedderProcess:
    """The configured embedder (:func:`appliance.vision.embedding.create_embedder`: SFace or
    dlib) in a child process, one request at a time over a socket pair (multiprocessing's
    Connection: pickled numpy arrays).

    The child is a fresh interpreter (``python -c``), not a fork: no thread or lock of the
    parent is inherited, and unlike multiprocessing's spawn it never re-imports the caller's
    main script."""

    def __init__(self, model_dir: Path, detector_model: str = "yunet",
                 name: str = "sface") -> None:
        self.model_dir, self.detector_model, self.name = Path(model_dir), detector_model, name
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self.restarts = 0
        self.peak_rss_mb = 0.0
        self.cpu_s = 0.0  # the child's CPU time (user + system) at its latest answer

    def start(self, timeout: float = EMBEDDER_START_TIMEOUT_S) -> bool:
        """Start the child and wait until its models are loaded; False if it did not come up."""
        parent_sock, child_sock = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_CODE, str(child_sock.fileno()),
                 str(self.model_dir), self.detector_model, self.name],
                pass_fds=(child_sock.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except OSError as err:
            _LOGGER.error("cannot start the descriptor process: %s", err)
            parent_sock.close()
            return False
        finally:
            child_sock.close()
        parent = Connection(parent_sock.detach())
        self._proc, self._conn = proc, parent
        try:
            if parent.poll(timeout) and parent.recv() == "ready":
                _LOGGER.info("descriptor process %d ready", proc.pid)
                return True
        except (EOFError, OSError) as err:
            _LOGGER.error("descriptor process failed to start: %s", err)
        else:
            _LOGGER.error("descriptor process not ready after %.0f s", timeout)
        self.stop()
        return False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def embed(self, crop: np.ndarray, det: Detection) -> tuple[np.ndarray | None, float]:
        """(descriptor or None, child ms). A dead or stuck child is restarted."""
        if not self.alive() and not self._restart():
            return None, 0.0
        conn = self._conn
        assert conn is not None  # alive() or a successful restart
        try:
            conn.send((crop, det.box, det.keypoints))
            if not conn.poll(EMBED_TIMEOUT_S):
                raise TimeoutError(f"no descriptor after {EMBED_TIMEOUT_S:.0f} s")
            answer = conn.recv()
        except (EOFError, OSError, TimeoutError) as err:
            _LOGGER.error("descriptor process failed (%s): restarting it", err)
            self._restart()
            return None, 0.0
        if isinstance(answer[0], str):
            _LOGGER.warning("descriptor failed: %s", answer[1])
            return None, 0.0
        vector, ms, (rss, cpu_s) = answer
        self.peak_rss_mb = max(self.peak_rss_mb, float(rss))
        self.cpu_s = float(cpu_s)
        return np.asarray(vector, dtype=np.float32), float(ms)

    def _restart(self) -> bool:
        self.stop()
        self.restarts += 1
        return self.start()

    def stop(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
            conn.close()
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


class InProcessEmbedder:
    """An embedder object given to the pipeline (tests, tools), run in the caller's thread
    with :class:`EmbedderProcess`'s interface."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.peak_rss_mb = 0.0
        self.cpu_s = 0.0  # counted in the caller's own process time

    def start(self, timeout: float = 0.0) -> bool:
        return True

    def alive(self) -> bool:
        return True

    def embed(self, crop: np.ndarray, det: Detection) -> tuple[np.ndarray | None, float]:
        t0 = time.perf_counter()
        vector = np.asarray(self.embedder.embed(crop, [det]), dtype=np.float32)[0]
        return vector, (time.perf_counter() - t0) * 1e3

    def stop(self) -> None:
        pass
