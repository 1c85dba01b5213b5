"""Pull the release the aggregator names for this device (``appliance update check``).

1. The offer comes from the heartbeat reply (the sync agent starts ``update.check_command``)
   or from ``GET /api/v1/releases/assigned`` (``classroom-update.timer``, and devices that
   heartbeat over MQTT).
2. Outside the window (a class in session, unless the rollout says otherwise) the device
   reports ``waiting`` and does nothing else.
3. The signed manifest and its signature are fetched and the signature checked against the
   keys baked into the image before any file is downloaded; only the files this device lacks
   (by sha256: the bundles it keeps, its installed dependency layer) are downloaded, each
   **resumable** (``Range`` on a ``.part`` left by an interrupted download) and **bounded**
   (the lower of ``update.max_bytes_per_s`` and the rollout's bound), then checked by sha256.
   A bad signature, a wrong hash or too little disk is refused and reported; nothing switched.
4. The release is applied by the one install/switch/trial/confirm-or-revert code of ``make
   deploy`` (:class:`appliance.update.manager.ReleaseManager`), the trial in this process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from appliance.config import ApplianceSettings
from appliance.update.manager import Outcome, ReleaseManager, UpdateError, refused
from appliance.update.reporting import reporter_for
from appliance.update.state import read_history
from cloud_sync import release_manifest as rm
from cloud_sync.protocol import ReleaseOffer

_LOGGER = logging.getLogger(__name__)

ASSIGNED_PATH = "/api/v1/releases/assigned"
CHUNK = 64 * 1024
REPORT_EVERY_S = 10.0
MAX_RETRIES = 5


def start_update_check(settings: ApplianceSettings, offer: ReleaseOffer) -> None:
    """Have ``appliance update check`` run for ``offer`` in a process of its own: touch
    ``update.request_file`` (classroom-update.path starts classroom-update.service, as root),
    or without one start a detached child (it outlives the appliance's restart)."""
    request = settings.update.request_file
    if request is not None:
        request.parent.mkdir(parents=True, exist_ok=True)
        request.write_text(offer.model_dump_json() + "\n")
        _LOGGER.info("release %s offered: update check requested (%s)", offer.version, request)
        return
    args = [sys.executable, "-m", "appliance", "update", "check",
            "--offer", offer.model_dump_json()]
    config = type(settings).toml_path
    if config is not None:
        args += ["--config", str(config)]
    log = settings.update.prefix / "update" / "check.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True)
    _LOGGER.info("release %s offered: update check started", offer.version)


class Throttle:
    """At most ``rate`` bytes per second on average since the start."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def take(self, n: int) -> None:
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


class Updater:
    def __init__(self, settings: ApplianceSettings, *, manager: ReleaseManager | None = None,
                 client: httpx.Client | None = None) -> None:
        sync = settings.sync
        if not sync.aggregator_url or sync.api_key is None:
            raise UpdateError("failed", "no aggregator configured (sync.aggregator_url, "
                              "sync.api_key): nothing to pull from")
        self.settings = settings
        self.cfg = settings.update
        self.manager = manager or ReleaseManager(settings, reporter=reporter_for(settings))
        self.client = client or httpx.Client(
            base_url=sync.aggregator_url.rstrip("/"), timeout=sync.request_timeout_s,
            headers={"Authorization": f"Bearer {sync.api_key.get_secret_value()}",
                     "User-Agent": "classroom-attendance-updater"})

    # -- the offer -------------------------------------------------------------------------
    def assigned(self) -> ReleaseOffer | None:
        response = self._get(ASSIGNED_PATH, params={"running": self.manager.current() or ""})
        if response.status_code == 204:
            return None
        try:
            return ReleaseOffer.model_validate_json(response.content)
        except ValueError as err:
            raise UpdateError("failed", f"unreadable offer: {err}") from err

    def check(self, offer: ReleaseOffer | None = None, *, ignore_window: bool = False
              ) -> Outcome | None:
        """Fetch and apply the offered release when it is time; None: nothing to do (no
        offer, already running it, another check running, a release given up on)."""
        with self._check_lock() as mine:
            if not mine:
                _LOGGER.info("another update check is running")
                return None
            try:
                offer = offer or self.assigned()
            except UpdateError as err:
                _LOGGER.warning("update check: %s", err.reason)
                return None
            if offer is None or offer.version == self.manager.current():
                return None
            given_up = self._given_up(offer.version)
            if given_up:
                _LOGGER.info("release %s was %s here; not trying again", offer.version,
                             given_up)
                return None
            if not (offer.allowed_now or ignore_window):
                self._waiting(offer)
                return Outcome("waiting", offer.version, offer.window_reason)
            try:
                source = self.download(offer)
            except UpdateError as err:
                self.manager.report(err.state, offer.version, err.reason)
                return Outcome(err.state, offer.version, err.reason)
            return self.manager.apply(source)

    def _given_up(self, version: str) -> str | None:
        for item in reversed(read_history(self.manager.layout, 50)):
            if item.version == version and item.state in ("reverted", "refused"):
                return item.state
        return None

    def _waiting(self, offer: ReleaseOffer) -> None:
        last = read_history(self.manager.layout, 1)
        if last and last[-1].state == "waiting" and last[-1].version == offer.version:
            return
        self.manager.report("waiting", offer.version, offer.window_reason)

    # -- the download ----------------------------------------------------------------------
    def download(self, offer: ReleaseOffer) -> Path:
        """update/download/<version> with the manifest, its signature (checked) and every
        file this device lacks (checked by sha256). Raises :class:`UpdateError`."""
        for url in (offer.manifest_url, offer.signature_url, offer.files_url):
            if not url.startswith("/api/") or "//" in url or ".." in url:
                # relative to the aggregator only: the device key goes to no other host
                raise UpdateError("failed", f"offer URL {url[:100]!r} is not on the aggregator")
        target = self.manager.layout.download / offer.version
        target.mkdir(parents=True, exist_ok=True)
        try:
            manifest_bytes = self._get(offer.manifest_url).content
            signature = self._get(offer.signature_url).content
            (target / rm.MANIFEST).write_bytes(manifest_bytes)
            (target / rm.SIGNATURE).write_bytes(signature)
        except OSError as err:
            raise self._os_error(err, "saving the manifest") from err
        manifest, _ = self.manager.check_manifest(target)  # the signature: refused if bad
        if manifest.version != offer.version:
            raise refused(f"the manifest is of {manifest.version}, not {offer.version}")
        self.manager.check_space(manifest)
        wanted = self.manager.missing(manifest, None)
        total = sum(e.size for e in wanted)
        rate = min(self.cfg.max_bytes_per_s, offer.max_bytes_per_s or self.cfg.max_bytes_per_s)
        self.manager.report("downloading", offer.version, done=0, total=total)
        throttle = Throttle(rate)
        done, last_report = 0, time.monotonic()
        for entry in wanted:
            path = target / entry.path
            if path.is_file() and path.stat().st_size == entry.size \
                    and rm.sha256_file(path) == entry.sha256:
                done += entry.size
                continue
            self._fetch(offer.files_url + entry.sha256, path, entry, throttle)
            done += entry.size
            if time.monotonic() - last_report > REPORT_EVERY_S:
                self.manager.report("downloading", offer.version, done=done, total=total)
                last_report = time.monotonic()
        _LOGGER.info("release %s: %d files, %d bytes downloaded at <= %d B/s", offer.version,
                     len(wanted), total, rate)
        return target

    def _fetch(self, url: str, path: Path, entry: rm.FileEntry, throttle: Throttle) -> None:
        part = path.with_name(path.name + ".part")
        path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(MAX_RETRIES):
            have = part.stat().st_size if part.exists() else 0
            if have > entry.size:
                part.unlink()
                have = 0
            if have < entry.size:
                try:
                    self._stream(url, part, have, throttle)
                except httpx.TransportError as err:
                    _LOGGER.info("download of %s interrupted (%s); resuming", entry.path, err)
                    time.sleep(min(30.0, 2.0 ** attempt))
                    continue
                except OSError as err:
                    raise self._os_error(err, f"downloading {entry.path}") from err
            if part.stat().st_size != entry.size:
                continue
            if rm.sha256_file(part) != entry.sha256:
                part.unlink()
                raise refused(f"{entry.path}: sha256 differs from the signed manifest "
                              "(downloaded file discarded)")
            os.replace(part, path)
            return
        raise UpdateError("failed", f"{entry.path}: download did not complete after "
                          f"{MAX_RETRIES} attempts")

    def _stream(self, url: str, part: Path, offset: int, throttle: Throttle) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self.client.stream("GET", url, headers=headers) as response:
            if response.status_code == 429:
                time.sleep(float(response.headers.get("Retry-After") or 5))
                raise httpx.TransportError("rate limited")
            if response.status_code == 416:
                part.unlink(missing_ok=True)
                raise httpx.TransportError("range not satisfiable: starting again")
            if response.status_code not in (200, 206):
                raise UpdateError("failed", f"GET {url}: HTTP {response.status_code}")
            mode = "ab" if response.status_code == 206 else "wb"  # 200: the server sent it all
            with part.open(mode) as fh:
                for chunk in response.iter_bytes(CHUNK):
                    fh.write(chunk)
                    throttle.take(len(chunk))

    def _get(self, path: str, **kwargs: object) -> httpx.Response:
        for attempt in range(MAX_RETRIES):
            try:
                response = self.client.get(path, **kwargs)  # type: ignore[arg-type]
            except httpx.TransportError as err:
                if attempt == MAX_RETRIES - 1:
                    raise UpdateError("failed", f"GET {path}: {err}") from err
                time.sleep(min(30.0, 2.0 ** attempt))
                continue
            if response.status_code == 429:
                time.sleep(float(response.headers.get("Retry-After") or 5))
                continue
            if response.status_code >= 400:
                raise UpdateError("failed", f"GET {path}: HTTP {response.status_code}")
            return response
        raise UpdateError("failed", f"GET {path}: rate limited")

    @staticmethod
    def _os_error(err: OSError, what: str) -> UpdateError:
        if err.errno == errno.ENOSPC:
            return refused(f"disk full while {what}")
        return UpdateError("failed", f"{what}: {err}")

    @contextlib.contextmanager
    def _check_lock(self) -> Iterator[bool]:
        """One check at a time (not the manager's lock: apply takes that one itself)."""
        lock = self.manager.layout.update / ".check.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
