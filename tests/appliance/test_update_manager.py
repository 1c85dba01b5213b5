"""The device's release manager (appliance.update.manager) on small bundles, in seconds.

The bundles here carry a small installer of their own (the real install-release.sh, pip and
venvs, runs in tests/fleet/test_deploy.py and test_update_rollout.py) and the "appliance" is
a /health server that answers for the release `current` points at, unhealthy for the releases
the test calls broken: what is under test is the manager's decisions (refuse, switch, confirm,
revert, resume after a reboot, prune) and what it leaves on disk.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from appliance import config as appliance_config
from appliance.update import manager as mgr
from appliance.update.manager import ReleaseManager
from appliance.update.state import read_history, read_pending, write_pending
from cloud_sync import release_manifest as rm

INSTALLER = """#!/bin/sh
set -eu
v=$(cat "$1/VERSION"); r="$2/releases/$v"
mkdir -p "$r/bin" "$2/deps/k1"; touch "$2/deps/k1/.installed"
echo k1 > "$r/.deps"; touch "$r/.installed"; echo "$r"
"""


def make_bundle(root: Path, version: str, key: object | None, unit: str = "v1") -> Path:
    wheel = f"wheels/classroom_attendance-{version}-py3-none-any.whl"
    for rel, data in {"VERSION": f"{version}\n".encode(), wheel: version.encode() * 50,
                      "wheels/numpy-2.0-cp311-none-any.whl": b"n" * 5000,
                      "models/face.tflite": b"m" * 3000, "install-release.sh": INSTALLER.encode(),
                      "systemd/classroom-appliance.service": f"[Unit]\n# {unit}\n".encode(),
                      "systemd/classroom-aggregator.service": b"[Unit]\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    rm.write_manifest(root, version=version, platform="native", project_wheel=wheel)
    if key is not None:
        rm.sign_bundle(root, key)  # type: ignore[arg-type]
    return root


class Appliance:
    """/health of the release `current` points at; the versions in ``broken`` have no camera."""

    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.broken: set[str] = set()
        self.restarts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                version = outer.current()
                camera = "unhealthy" if version in outer.broken else "healthy"
                body = json.dumps({"version": version, "components": {
                    "camera": {"status": camera, "message": f"camera {camera}"},
                    "detector": {"status": "healthy", "frames": 5},
                    "database": {"status": "healthy"},
                    "aggregator": {"status": "not_configured"}}}).encode()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def current(self) -> str | None:
        try:
            return (self.prefix / "current").readlink().name
        except OSError:
            return None


@pytest.fixture
def device(tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ReleaseManager, Appliance, object]]:
    monkeypatch.setattr(mgr, "PROBE_EVERY_S", 0.05)
    private, public = rm.generate_keypair()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "office.pub").write_bytes(public)
    prefix = tmp_path / "opt"
    app = Appliance(prefix)
    (tmp_path / "units").mkdir()
    settings = appliance_config.load(None, web={"port": app.port}, update={
        "prefix": prefix, "keys_dir": keys, "units_dir": tmp_path / "units", "systemctl": "",
        "restart_command": f"touch {tmp_path}/restarted", "confirm_command": "",
        "min_free_mb": 0})
    manager = ReleaseManager(settings, trial_s=1.0)
    yield manager, app, rm.load_private_key(private)
    app.server.shutdown()


def test_good_release_is_confirmed_and_a_broken_one_reverted(tmp_path: Path, device: tuple) -> None:
    manager, app, key = device
    one = manager.apply(make_bundle(tmp_path / "b1", "1.0", key))
    assert (one.state, manager.current()) == ("confirmed", "1.0")
    two = manager.apply(make_bundle(tmp_path / "b2", "2.0", key, unit="v2"))
    assert (two.state, manager.current()) == ("confirmed", "2.0")
    units = tmp_path / "units"
    assert "# v2" in (units / "classroom-appliance.service").read_text()
    assert not (units / "classroom-aggregator.service").exists()  # the server's unit stays out
    app.broken.add("3.0")
    three = manager.apply(make_bundle(tmp_path / "b3", "3.0", key, unit="v3"))
    assert three.state == "reverted"
    assert "camera unhealthy" in str(three.reason)
    assert manager.current() == "2.0"
    assert "# v2" in (units / "classroom-appliance.service").read_text()  # old units back
    assert read_pending(manager.layout) is None
    states = [(r.state, r.version) for r in read_history(manager.layout)]
    assert states[-3:] == [("installing", "3.0"), ("trial", "3.0"), ("reverted", "3.0")]
    assert manager.status()["report"]["reason"].startswith("not healthy within 1 s")
    # confirmed releases prune: 2.0 kept with 1.0 (previous), and 3.0 still there until the
    # next confirmation
    assert sorted(p.name for p in manager.layout.releases.iterdir()) == ["1.0", "2.0", "3.0"]
    four = manager.apply(make_bundle(tmp_path / "b4", "4.0", key))
    assert four.state == "confirmed"
    assert sorted(p.name for p in manager.layout.releases.iterdir()) == ["2.0", "4.0"]
    assert sorted(p.name for p in manager.layout.bundles.iterdir()) == ["2.0", "4.0"]
    again = manager.apply(make_bundle(tmp_path / "b5", "4.0", key))
    assert again.state == "unchanged"


@pytest.mark.parametrize(("change", "reason"), [
    (lambda b: (b / "models/face.tflite").write_bytes(b"x" * 3000), "sha256 differs"),
    (lambda b: (b / rm.MANIFEST).write_bytes((b / rm.MANIFEST).read_bytes().replace(
        b'"native"', b'"arm64"')), "bad signature"),
    (lambda b: (b / rm.SIGNATURE).unlink(), "unsigned"),
    (lambda b: rm.sign_bundle(b, rm.load_private_key(rm.generate_keypair()[0])),
     "does not trust"),
])
def test_bad_bundles_are_refused_and_nothing_switched(tmp_path: Path, device: tuple,
                                                       change, reason: str) -> None:  # type: ignore[no-untyped-def]
    manager, _app, key = device
    assert manager.apply(make_bundle(tmp_path / "b1", "1.0", key)).state == "confirmed"
    bundle = make_bundle(tmp_path / "b2", "2.0", key)
    change(bundle)
    outcome = manager.apply(bundle)
    assert outcome.state == "refused" and reason in str(outcome.reason)
    assert manager.current() == "1.0"
    assert not manager.layout.release("2.0").exists()
    assert not (manager.layout.bundles / "2.0").exists()
    assert manager.status()["report"]["state"] == "refused"


def test_full_disk_is_refused(tmp_path: Path, device: tuple) -> None:
    manager, _app, key = device
    manager.cfg.min_free_mb = 100_000_000  # more than any disk here has
    outcome = manager.apply(make_bundle(tmp_path / "b1", "1.0", key))
    assert outcome.state == "refused" and str(outcome.reason).startswith("disk: ")
    assert manager.current() is None


def test_an_upload_of_missing_files_only_is_completed_from_the_device(tmp_path: Path,
                                                                      device: tuple) -> None:
    manager, _app, key = device
    manager.apply(make_bundle(tmp_path / "b1", "1.0", key))
    full = make_bundle(tmp_path / "b2", "2.0", key)
    manifest = rm.parse_manifest((full / rm.MANIFEST).read_bytes())
    upload = manager.layout.incoming / "2.0"
    upload.mkdir(parents=True)
    for name in (rm.MANIFEST, rm.SIGNATURE):
        (upload / name).write_bytes((full / name).read_bytes())
    # the deps layer (k1) is not the key of this manifest: the dependency wheel is on the
    # device in bundles/1.0 anyway, so only the changed files are missing
    missing = sorted(e.path for e in manager.missing(manifest, upload))
    assert missing == ["VERSION", "wheels/classroom_attendance-2.0-py3-none-any.whl"]
    for rel in missing:
        (upload / rel).parent.mkdir(parents=True, exist_ok=True)
        (upload / rel).write_bytes((full / rel).read_bytes())
    assert manager.apply(upload).state == "confirmed"
    assert not upload.exists()  # consumed
    assert (manager.layout.bundles / "2.0" / "models/face.tflite").stat().st_nlink >= 2


def test_a_reboot_during_the_trial_resumes_it_and_reverts_after_too_many(
        tmp_path: Path, device: tuple) -> None:
    manager, app, key = device
    manager.apply(make_bundle(tmp_path / "b1", "1.0", key))
    assert manager.apply(make_bundle(tmp_path / "b2", "2.0", key), detach=True).state == "trial"
    pending = read_pending(manager.layout)
    assert pending is not None and pending["previous"] == "1.0"
    # the power went out: another boot; the trial starts over and confirms a healthy release
    write_pending(manager.layout, {**pending, "boot_id": "an-earlier-boot"})
    outcome = manager.confirm_pending()
    assert outcome is not None and outcome.state == "confirmed"
    assert manager.confirm_pending() is None  # nothing on trial any more
    # a release that keeps the device rebooting: reverted at the second boot on trial
    app.broken.add("3.0")
    manager.apply(make_bundle(tmp_path / "b3", "3.0", key), detach=True)
    pending = read_pending(manager.layout)
    write_pending(manager.layout, {**pending, "boot_id": "an-earlier-boot", "boots": 1})
    outcome = manager.confirm_pending()
    assert outcome is not None and outcome.state == "reverted"
    assert "rebooted 2 times" in str(outcome.reason)
    assert manager.current() == "2.0"


def test_a_release_that_refuses_the_device_settings_is_not_switched(
        tmp_path: Path, device: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new release's own `appliance config show` reads the device's configuration file
    before the switch: a release whose settings model rejects it is refused."""
    manager, _, key = device
    assert manager.apply(make_bundle(tmp_path / "b1", "1.0", key)).state == "confirmed"
    config = tmp_path / "appliance.toml"
    config.write_text("[device]\nroom_id = 'LAB-301'\n")
    monkeypatch.setattr(type(manager.settings), "toml_path", config)  # as loaded from it
    strict = INSTALLER.replace('echo "$r"', (
        "printf '#!/bin/sh\\necho \"update.prefix: unknown key\" >&2\\nexit 2\\n' "
        '> "$r/bin/appliance"; chmod +x "$r/bin/appliance"; echo "$r"'))
    bundle = make_bundle(tmp_path / "b2", "2.0", None)
    (bundle / "install-release.sh").write_text(strict)
    rm.write_manifest(bundle, version="2.0", platform="native",
                      project_wheel="wheels/classroom_attendance-2.0-py3-none-any.whl")
    rm.sign_bundle(bundle, key)
    outcome = manager.apply(bundle)
    assert outcome.state == "refused", outcome
    assert "does not accept this device's settings" in str(outcome.reason)
    assert "unknown key" in str(outcome.reason)
    assert manager.current() == "1.0"
    # a release whose program accepts the file goes through
    ok = INSTALLER.replace('echo "$r"', (
        "printf '#!/bin/sh\\nexit 0\\n' > \"$r/bin/appliance\"; chmod +x \"$r/bin/appliance\"; "
        'echo "$r"'))
    bundle = make_bundle(tmp_path / "b3", "3.0", None)
    (bundle / "install-release.sh").write_text(ok)
    rm.write_manifest(bundle, version="3.0", platform="native",
                      project_wheel="wheels/classroom_attendance-3.0-py3-none-any.whl")
    rm.sign_bundle(bundle, key)
    assert manager.apply(bundle).state == "confirmed"
