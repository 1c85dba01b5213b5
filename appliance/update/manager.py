"""Install, switch, confirm or revert a release on this device: the one code path of
``make deploy`` (over SSH) and of the pulled update (``appliance update check``).

``apply(source)``:

1. the manifest's signature is checked first (a pulled release always; ``make deploy`` when
   the bundle is signed, or unsigned with ``--unsigned``);
2. the bundle is staged in ``bundles/<version>``: files from ``source`` (the upload or the
   download), the rest by sha256 from the bundles already on the device (hard links); then
   EVERY file's size and sha256 is checked against the manifest. Dependency wheels whose
   exact set is already installed (the deps layer of the same key) are not needed at all;
3. free space is checked (``update.min_free_mb`` stays free), then the bundle's own
   ``install-release.sh`` installs the release beside the current one;
4. the bundle's device units are installed (daemon-reload, new ones enabled), ``pending.json``
   is written, ``previous`` and ``current`` are switched and the appliance restarted;
5. the trial: the new release must report healthy (:func:`probe.release_healthy`) within
   ``update.trial_s``; then it is confirmed and old releases are pruned; otherwise ``current``
   goes back to ``previous``, the old units return and the appliance restarts on the old
   release (the reason is recorded and reported).

A bad signature, a wrong hash, a missing file or too little disk refuses the release before
anything is switched. The trial runs in the process that applied (the updater's service), or,
for ``make deploy`` (``--detach``), in ``classroom-release-confirm.service``, which also runs
at boot while a trial is pending and uses the PREVIOUS release's code: a laptop that
disconnects, a power cut or a broken new release cannot strand the device.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config import ApplianceSettings
from appliance.update import probe
from appliance.update.state import (
    Layout,
    boot_id,
    now,
    read_pending,
    read_report,
    switch_link,
    write_atomic,
    write_pending,
    write_report,
)
from cloud_sync import release_manifest as rm
from cloud_sync.protocol import UpdateReport

_LOGGER = logging.getLogger(__name__)

INSTALLER = "install-release.sh"
PROJECT_WHEEL_PREFIX = "classroom_attendance-"
PROBE_EVERY_S = 2.0
# the device's units in a bundle's systemd/ (the aggregator's units are not installed here)
UNIT_SUFFIXES = (".service", ".timer", ".path")
Reporter = Callable[[UpdateReport], None]


class UpdateError(RuntimeError):
    """An update step failed. ``state`` is what it is reported as: ``refused`` (the release
    itself is unacceptable here: signature, hash, disk; never retried) or ``failed``."""

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


def refused(reason: str) -> UpdateError:
    return UpdateError("refused", reason)


@dataclass
class Outcome:
    state: str  # unchanged | trial | confirmed | reverted | refused | failed
    version: str
    reason: str | None = None


def is_dependency_wheel(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return (path.startswith("wheels/") and name.endswith(".whl")
            and not name.startswith(PROJECT_WHEEL_PREFIX))


def deps_key(manifest: rm.Manifest, python_version: str, site: str) -> str:
    """The key of the dependency layer this manifest needs: the same computation as
    install-release.sh (tests/fleet check that both agree)."""
    key = hashlib.sha256(f"{python_version}\n{site}\n".encode())
    for entry in sorted(manifest.files, key=lambda e: e.path):
        if is_dependency_wheel(entry.path):
            key.update(f"{entry.path.rsplit('/', 1)[-1]} {entry.sha256}\n".encode())
    return key.hexdigest()[:16]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _disk_full(err: BaseException | str) -> bool:
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    return "No space left on device" in str(err)


class ReleaseManager:
    def __init__(self, settings: ApplianceSettings, *, reporter: Reporter | None = None,
                 trial_s: float | None = None) -> None:
        self.settings = settings
        self.cfg = settings.update
        self.layout = Layout(self.cfg.prefix)
        self.reporter = reporter
        self.trial_s = trial_s or self.cfg.trial_s
        self.health_url = f"http://127.0.0.1:{settings.web.port}/health"

    # -- what is there ---------------------------------------------------------------------
    def current(self) -> str | None:
        return self.layout.link_version(self.layout.current)

    def status(self) -> dict[str, Any]:
        report = read_report(self.layout)
        return {"current": self.current(), "previous": self.layout.link_version(
                    self.layout.previous),
                "pending": read_pending(self.layout),
                "report": None if report is None else report.model_dump(mode="json")}

    def report(self, state: str, version: str | None, reason: str | None = None, *,
               done: int | None = None, total: int | None = None) -> UpdateReport:
        item = UpdateReport(state=state, version=version, running=self.current(),  # type: ignore[arg-type]
                            reason=None if reason is None else reason[:500], at=now(),
                            done_bytes=done, total_bytes=total)
        write_report(self.layout, item)
        log = _LOGGER.warning if state in ("reverted", "refused", "failed") else _LOGGER.info
        log("update %s: %s%s", version, state, f" ({reason})" if reason else "")
        if self.reporter is not None:
            try:
                self.reporter(item)
            except Exception as err:  # reporting is best effort: the heartbeat carries it too
                _LOGGER.info("update report not sent (%s); the heartbeat will carry it", err)
        return item

    def interpreter(self) -> tuple[str, str, str]:
        """(python executable, its sys.version, the venv flag) the releases are built with:
        the base interpreter and --system-site-packages flag of the current release."""
        python, site = "python3", ""
        cfg = self.layout.current / "pyvenv.cfg"
        if cfg.is_file():
            values = dict(line.split("=", 1) for line in cfg.read_text().splitlines()
                          if "=" in line)
            values = {k.strip(): v.strip() for k, v in values.items()}
            if values.get("include-system-site-packages") == "true":
                site = "--system-site-packages"
            exe = values.get("executable") or (
                str(Path(values["home"]) / "python3") if "home" in values else "")
            if exe and Path(exe).exists():
                python = exe
        version = subprocess.run([python, "-c", "import sys; print(sys.version)"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        return python, version, site

    def local_files(self) -> dict[str, Path]:
        """sha256 -> a file on this device with that content (the kept bundles)."""
        found: dict[str, Path] = {}
        for manifest_path in sorted(self.layout.bundles.glob(f"*/{rm.MANIFEST}")):
            try:
                manifest = rm.parse_manifest(manifest_path.read_bytes())
            except (OSError, rm.ReleaseError):
                continue
            for entry in manifest.files:
                path = manifest_path.parent / entry.path
                if path.is_file() and path.stat().st_size == entry.size:
                    found.setdefault(entry.sha256, path)
        return found

    def needed(self, manifest: rm.Manifest) -> list[rm.FileEntry]:
        """The files this device must have to install ``manifest``: every file, except the
        dependency wheels when their exact set is installed already (the deps layer)."""
        _, version, site = self.interpreter()
        key = deps_key(manifest, version, site)
        have_deps = (self.layout.deps / key / ".installed").exists()
        return [e for e in manifest.files if not (have_deps and is_dependency_wheel(e.path))]

    def missing(self, manifest: rm.Manifest, source: Path | None = None) -> list[rm.FileEntry]:
        """Needed files neither in ``source`` nor on the device (what to send or download)."""
        local = self.local_files()
        out = []
        for entry in self.needed(manifest):
            there = source / entry.path if source is not None else None
            if there is not None and there.is_file() and there.stat().st_size == entry.size:
                continue
            if entry.sha256 not in local:
                out.append(entry)
        return out

    # -- verification ----------------------------------------------------------------------
    def trusted_keys(self) -> dict[str, Any]:
        try:
            return rm.load_public_keys([self.cfg.keys_dir]) if self.cfg.keys_dir.is_dir() else {}
        except rm.ReleaseError as err:
            raise UpdateError("failed", f"trusted keys: {err}") from err

    def check_manifest(self, source: Path, *,
                       allow_unsigned: bool = False) -> tuple[rm.Manifest, bytes]:
        """The manifest of ``source``, its signature verified (unless unsigned is allowed and
        the bundle carries none). Raises a refusal."""
        try:
            data = (source / rm.MANIFEST).read_bytes()
            manifest = rm.parse_manifest(data)
            sig = source / rm.SIGNATURE
            if sig.exists():
                rm.verify_signature(data, sig.read_bytes(), self.trusted_keys())
            elif not allow_unsigned:
                raise rm.ReleaseError("unsigned release (no manifest.sig)")
        except FileNotFoundError as err:
            raise refused(f"no {rm.MANIFEST} in {source}") from err
        except rm.ReleaseError as err:
            raise refused(str(err)) from err
        return manifest, data

    def stage(self, source: Path, manifest: rm.Manifest) -> Path:
        """bundles/<version> with every needed file, each checked by size and sha256."""
        final = self.layout.bundles / manifest.version
        staging = self.layout.bundles / f".staging-{manifest.version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        local = self.local_files()
        try:
            for extra in (rm.MANIFEST, rm.SIGNATURE):
                if (source / extra).exists():
                    shutil.copy2(source / extra, staging / extra)
            for entry in self.needed(manifest):
                there = source / entry.path
                src = there if there.is_file() else local.get(entry.sha256)
                if src is None:
                    raise refused(f"{entry.path}: missing (neither sent nor on the device)")
                _link_or_copy(src, staging / entry.path)
                if (staging / entry.path).stat().st_size != entry.size:
                    raise refused(f"{entry.path}: {(staging / entry.path).stat().st_size} "
                                  f"bytes, the manifest says {entry.size}")
                if rm.sha256_file(staging / entry.path) != entry.sha256:
                    raise refused(f"{entry.path}: sha256 differs from the signed manifest")
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            if _disk_full(err):
                raise refused(f"disk full while staging the release ({err})") from err
            raise UpdateError("failed", f"staging: {err}") from err
        except UpdateError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists() and self.current() != manifest.version:
            shutil.rmtree(final)
        if not final.exists():
            staging.rename(final)
        else:
            shutil.rmtree(staging)
        return final

    def check_space(self, manifest: rm.Manifest) -> None:
        """Refuse when installing would leave less than ``update.min_free_mb`` free."""
        needed = self.needed(manifest)
        deps = sum(e.size for e in needed if is_dependency_wheel(e.path))
        rest = sum(e.size for e in needed if not is_dependency_wheel(e.path))
        # an unpacked dependency set takes ~2.5x its wheels; the thin release a few times
        # the project wheel plus a copy of the models
        estimate = int(deps * 2.5 + rest * 1.5)
        self.layout.prefix.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.layout.prefix).free
        reserve = self.cfg.min_free_mb * 1024 * 1024
        if free - estimate < reserve:
            raise refused(f"disk: {free / 1e6:.0f} MB free, the release needs about "
                          f"{estimate / 1e6:.0f} MB and {self.cfg.min_free_mb} MB must stay free")

    # -- install ---------------------------------------------------------------------------
    def install(self, bundle: Path, version: str) -> Path:
        """The release venv (a no-op when installed). The bundle's files stay in bundles/ (the
        dependency wheels too): a later release that changes one dependency needs only that
        wheel sent. Then the new release reads this device's settings (before any switch)."""
        if not self.layout.installed(version):
            self._run_installer(bundle, version)
        self.check_settings(version)
        return self.layout.release(version)

    def check_settings(self, version: str) -> None:
        """Refuse a release whose settings model does not accept this device's configuration
        file (a key renamed or removed, a bound tightened): it would not start after the
        switch. Its ``appliance config show`` loads the file exactly as its service will."""
        config = type(self.settings).toml_path
        program = self.layout.release(version) / "bin" / "appliance"
        if config is None or not program.is_file():
            return
        done = subprocess.run([str(program), "config", "show", "--config", str(config)],
                              capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise refused(f"release {version} does not accept this device's settings "
                          f"({config}): {tail}")

    def _run_installer(self, bundle: Path, version: str) -> None:
        python, _, site = self.interpreter()
        cmd = ["sh", str(bundle / INSTALLER), str(bundle), str(self.layout.prefix)]
        if site:
            cmd.append(site)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHON": python})
        if done.returncode != 0:
            shutil.rmtree(self.layout.release(version), ignore_errors=True)
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            if _disk_full(tail) or _disk_full(done.stdout):
                raise refused(f"disk full while installing: {tail}")
            raise UpdateError("failed", f"install-release.sh: {tail}")

    def install_units(self, bundle: Path | None) -> list[str]:
        """The bundle's device units into ``update.units_dir``; returns the changed ones."""
        units_dir = self.cfg.units_dir
        if units_dir is None or bundle is None or not (bundle / "systemd").is_dir():
            return []
        changed, added = [], []
        for unit in sorted((bundle / "systemd").iterdir()):
            if not unit.name.startswith("classroom-") or unit.suffix not in UNIT_SUFFIXES \
                    or unit.name.startswith("classroom-aggregator"):
                continue
            target = units_dir / unit.name
            text = unit.read_bytes()
            if target.exists() and target.read_bytes() == text:
                continue
            if not target.exists() and b"[Install]" in text:
                added.append(unit.name)
            write_atomic(target, text)
            changed.append(unit.name)
        if changed and self.cfg.systemctl:
            self._run(f"{self.cfg.systemctl} daemon-reload", "daemon-reload")
            if added:
                self._run(f"{self.cfg.systemctl} enable {' '.join(added)}", "enable units")
        return changed

    def _run(self, command: str, what: str) -> None:
        done = subprocess.run(command, shell=True, capture_output=True, text=True, check=False)  # noqa: S602 (the operator's configured command)
        if done.returncode != 0:
            _LOGGER.warning("%s (%s) failed: %s", what, command, done.stderr.strip()[-300:])

    def restart(self) -> None:
        self._run(self.cfg.restart_command, "restart")

    # -- the whole thing -------------------------------------------------------------------
    def apply(self, source: Path, *, allow_unsigned: bool = False,
              detach: bool = False) -> Outcome:
        """Verify, install, switch and (unless ``detach``) run the trial. Never raises for a
        refused or failed release: the outcome says what happened, and it is reported."""
        with self.layout.lock():
            version = "?"
            try:
                manifest, _ = self.check_manifest(source, allow_unsigned=allow_unsigned)
                version = manifest.version
                pending = read_pending(self.layout)
                if self.current() == version and pending is None:
                    self._cleanup_source(source)
                    return Outcome("unchanged", version, "already running this release")
                if pending is not None:
                    raise UpdateError("failed", f"release {pending['version']} is on trial")
                self.report("installing", version)
                self.check_space(manifest)
                bundle = self.stage(source, manifest)
                self.install(bundle, version)
            except UpdateError as err:
                self.report(err.state, None if version == "?" else version, err.reason)
                return Outcome(err.state, version, err.reason)
            self._cleanup_source(source)
            self.activate(version)
            if detach:
                self._start_trial()
                return Outcome("trial", version)
            return self._trial()

    def _cleanup_source(self, source: Path) -> None:
        """An upload or download consumed: its files are in bundles/ now."""
        source = source.resolve()
        for parent in (self.layout.incoming, self.layout.download):
            if parent.resolve() in source.parents:
                shutil.rmtree(source, ignore_errors=True)

    def activate(self, version: str) -> None:
        old = self.current()
        write_pending(self.layout, {
            "format": 1, "version": version, "previous": old, "boot_id": boot_id(),
            "started_mono": time.monotonic(), "boots": 0, "trial_s": self.trial_s})
        self.install_units(self.layout.bundles / version)
        if old is not None and old != version:
            switch_link(self.layout.previous, f"releases/{old}")
        switch_link(self.layout.current, f"releases/{version}")
        self.report("trial", version)
        self.restart()

    def _start_trial(self) -> None:
        command = self.cfg.confirm_command.strip()
        if command:
            self._run(command, "start the trial")
            return
        # no service manager (a test host): a child in its own session outlives the caller
        args = [sys.executable, "-m", "appliance", "update", "confirm"]
        config = type(self.settings).toml_path
        if config is not None:
            args += ["--config", str(config)]
        with (self.layout.update / "confirm.log").open("ab") as log:
            subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)

    def confirm_pending(self) -> Outcome | None:
        """Run (or resume) the trial of a pending release; None when nothing is pending."""
        with self.layout.lock():
            if read_pending(self.layout) is None:
                return None
            return self._trial()

    def _trial(self) -> Outcome:
        pending = read_pending(self.layout)
        assert pending is not None
        version = str(pending["version"])
        trial_s = float(pending.get("trial_s") or self.trial_s)  # type: ignore[arg-type]
        if pending.get("boot_id") != boot_id():  # rebooted during the trial
            pending["boots"] = int(pending.get("boots") or 0) + 1  # type: ignore[call-overload]
            pending["boot_id"], pending["started_mono"] = boot_id(), time.monotonic()
            write_pending(self.layout, pending)
            if int(pending["boots"]) >= self.cfg.max_boots_on_trial:  # type: ignore[call-overload]
                return self._revert(pending, f"rebooted {pending['boots']} times on trial")
        deadline = float(pending["started_mono"]) + trial_s  # type: ignore[arg-type]
        reason = "no answer"
        while True:
            found = probe.release_healthy(probe.read_health(self.health_url), version)
            if found is None:
                return self._confirm(version)
            reason = found
            if time.monotonic() >= deadline:
                return self._revert(pending, f"not healthy within {trial_s:.0f} s: {reason}")
            time.sleep(PROBE_EVERY_S)

    def _confirm(self, version: str) -> Outcome:
        self.layout.pending_file.unlink(missing_ok=True)
        self.report("confirmed", version)
        self.prune()
        return Outcome("confirmed", version)

    def _revert(self, pending: dict[str, Any], reason: str) -> Outcome:
        version, old = str(pending["version"]), pending.get("previous")
        if not old:
            self.layout.pending_file.unlink(missing_ok=True)
            self.report("failed", version, f"{reason}; no previous release to go back to")
            return Outcome("failed", version, reason)
        self.install_units(self.layout.bundles / str(old))
        switch_link(self.layout.current, f"releases/{old}")
        self.layout.pending_file.unlink(missing_ok=True)
        self.restart()
        after = self._wait_healthy(str(old), float(pending.get("trial_s") or self.trial_s))
        note = ("" if after is None
                else f"; the previous release {old} is not healthy either: {after}")
        self.report("reverted", version, f"{reason}{note}")
        return Outcome("reverted", version, reason + note)

    def _wait_healthy(self, version: str, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while True:
            found = probe.release_healthy(probe.read_health(self.health_url), version)
            if found is None or time.monotonic() >= deadline:
                return found
            time.sleep(PROBE_EVERY_S)

    def prune(self) -> list[str]:
        """Keep the current release and the previous one (the revert target), their bundles
        and the deps layers they use; remove the rest (oldest first is implied: all of it)."""
        keep = {v for v in (self.current(), self.layout.link_version(self.layout.previous)) if v}
        removed = []
        for directory in (self.layout.releases, self.layout.bundles):
            if not directory.is_dir():
                continue
            for item in directory.iterdir():
                if item.name not in keep and not item.name.startswith(".staging-"):
                    shutil.rmtree(item, ignore_errors=True)
                    if directory == self.layout.releases:
                        removed.append(item.name)
        used = {(self.layout.release(v) / ".deps").read_text().strip()
                for v in keep if (self.layout.release(v) / ".deps").is_file()}
        if self.layout.deps.is_dir():
            for layer in self.layout.deps.iterdir():
                if layer.name not in used:
                    shutil.rmtree(layer, ignore_errors=True)
        for stale in (self.layout.incoming, self.layout.download):
            if stale.is_dir():
                for item in stale.iterdir():
                    if item.name not in keep:
                        shutil.rmtree(item, ignore_errors=True)
        return removed
