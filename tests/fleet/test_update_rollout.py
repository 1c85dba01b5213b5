"""Pulled updates with real processes: the aggregator (`aggregator serve`) and three devices,
each a real `appliance run` (reading a video file) with its own data directory and /opt
prefix, installed with release 1 as a flashed card is. Nobody logs in to a device: each
learns of a release from its heartbeat reply, starts `appliance update check` (a detached
process here; classroom-update.path on a Pi), downloads what it lacks, verifies, installs,
switches, and confirms itself once healthy.

1. Release 2 (the project's wheel changed): the canary room's device confirms first, then the
   other two (share, then all), each confirming; the rollout is done.
2. The release that breaks the camera: the canary reverts to release 2 by itself, the rollout
   halts with the device and the reason, the other devices are never offered it.
3. A bundle with a changed file and one signed by a key the devices do not trust: refused by
   `aggregator releases add`; and at the device (the file changed at the aggregator after it
   was added; a key the aggregator trusts but the cards do not): refused, nothing switched,
   the rollout halted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cloud_sync import release_manifest as rm
from cloud_sync.aggregator.cli import app as aggregator_cli
from tests.conftest import require
from tests.fleet.releases import BROKEN, V1, V2, Releases
from tests.fleet.test_deploy import SERVICE, free_port
from tests.support.harness import Aggregator, wait_until

pytestmark = pytest.mark.slow(seconds=420)

CANARY, OTHER = "ROOM-CANARY", "ROOM-OTHER"
DEVICES = {"pi-canary": CANARY, "pi-two": OTHER, "pi-three": OTHER}
TRIAL_S = 150

CONFIG = """
[device]
device_id = "{name}"
room_id = "{room}"
site = "north"
[camera]
source = "{clip}"
loop_file = true
fps = 4.0
[web]
host = "127.0.0.1"
port = {port}
[sync]
aggregator_url = "{url}"
api_key = "{key}"
heartbeat_s = 5
[update]
prefix = "{prefix}"
keys_dir = "{home}/keys"
restart_command = "sh {home}/service.sh"
confirm_command = ""
units_dir = "{home}/units"
systemctl = ""
request_file = ""
trial_s = {trial}
min_free_mb = 50
"""


@dataclass
class Device:
    name: str
    room: str
    home: Path

    @property
    def prefix(self) -> Path:
        return self.home / "opt/classroom-attendance"

    def current(self) -> str:
        return os.readlink(self.prefix / "current").removeprefix("releases/")

    def history(self) -> list[dict[str, Any]]:
        path = self.prefix / "update" / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def start(self) -> None:
        subprocess.run(["sh", str(self.home / "service.sh")], check=True)

    def stop(self) -> None:
        pid_file = self.home / "appliance.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


@dataclass
class Fleet:
    agg: Aggregator
    admin: dict[str, str]
    devices: list[Device]
    env: dict[str, str]

    def cli(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(aggregator_cli, ["releases", *args], env=self.env)
        error = result.exception
        if error is not None and not isinstance(error, SystemExit):  # say what broke
            return result.exit_code, result.output + "".join(
                traceback.format_exception(error))
        return result.exit_code, result.output

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.agg.base_url, headers=self.admin, timeout=30)

    def rollout(self) -> dict[str, Any]:
        with self.api() as c:
            return c.get("/api/v1/releases").json()["rollouts"][0]  # type: ignore[no-any-return]

    def start_rollout(self, version: str, share: int = 50) -> None:
        with self.api() as c:
            r = c.post("/api/v1/releases/rollout", json={
                "version": version, "canary_room": CANARY, "share_pct": share})
            assert r.status_code == 201, r.text

    def reports(self, version: str) -> list[tuple[str, str, datetime]]:
        """(device, state, received_at) the aggregator holds for ``version``, in order."""
        from sqlalchemy import select

        from cloud_sync.aggregator.db.models import DeviceUpdate
        from cloud_sync.aggregator.db.session import make_engine, make_session_factory

        engine = make_engine(self.agg.db_url)
        try:
            with make_session_factory(engine)() as session:
                rows = session.scalars(select(DeviceUpdate).where(
                    DeviceUpdate.version == version).order_by(DeviceUpdate.id))
                return [(r.device_id, r.state, r.received_at) for r in rows]
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, faces_dir: Path,
          releases: Releases) -> Iterator[Fleet]:
    from cloud_sync.aggregator.db.migrate import upgrade
    from cloud_sync.aggregator.db.models import Room
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory
    from cloud_sync.aggregator.services.devices import add_device, create_admin_token

    clip = faces_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"
    require(clip.is_file(), f"{clip} missing")
    base = tmp_path_factory.mktemp("rollout")
    agg = Aggregator(base / "aggregator")
    upgrade(agg.db_url)
    engine = make_engine(agg.db_url)
    keys: dict[str, str] = {}
    with make_session_factory(engine)() as session:
        now = datetime.now(UTC)
        for room in (CANARY, OTHER):  # no timetable: no class, updates allowed now
            session.add(Room(id=room, name=room, site="north", timezone="UTC",
                             created_at=now))
        session.commit()
        for name, room in DEVICES.items():
            keys[name] = add_device(session, room, name)[1]
        token = create_admin_token(session, "tests")[1]
    engine.dispose()
    env = {"AGGREGATOR_DATABASE_URL": agg.db_url,
           "AGGREGATOR_DATA_DIR": str(agg.dir / "data")}
    fleet = Fleet(agg, {"Authorization": f"Bearer {token}"}, [], env)
    # the office's public key at the aggregator; releases 2 and broken added
    code, out = fleet.cli("trust", str(releases.public_key))
    assert code == 0, out
    for version in (V2, BROKEN):
        code, out = fleet.cli("add", str(releases.bundles[version]))
        assert code == 0, out
    agg.start()
    for name, room in DEVICES.items():
        home = base / name
        for sub in ("data", "units", "keys"):
            (home / sub).mkdir(parents=True)
        shutil.copy(releases.public_key, home / "keys" / "office.pub")
        device = Device(name, room, home)
        releases.install(device.prefix, V1)  # a flashed card: release 1 and its bundle
        (home / "service.sh").write_text(SERVICE.format(here=home, prefix=device.prefix))
        (home / "appliance.toml").write_text(CONFIG.format(
            name=name, room=room, clip=clip, port=free_port(), url=agg.base_url,
            key=keys[name], prefix=device.prefix, home=home, trial=TRIAL_S))
        fleet.devices.append(device)
    for device in fleet.devices:
        device.start()
    yield fleet
    for device in fleet.devices:
        device.stop()
    agg.stop()


def _logs(fleet: Fleet) -> str:
    out = []
    for d in fleet.devices:
        for name in ("appliance.log", "opt/classroom-attendance/update/check.log"):
            path = d.home / name
            if path.exists():
                out.append(f"--- {d.name} {name}\n{path.read_text()[-1500:]}")
    return "\n".join(out)


def _wait(fleet: Fleet, check: Any, timeout: float, what: str) -> None:
    try:
        wait_until(check, timeout, what, interval_s=2.0)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{_logs(fleet)}") from err


def _running(fleet: Fleet, version: str) -> bool:
    with fleet.api() as c:
        r = c.get("/api/v1/devices")
    seen = {d["id"]: d.get("software_version") for d in r.json()} if r.is_success else {}
    return all(seen.get(d.name) == version for d in fleet.devices)


def _fake_release(releases: Releases, version: str, out: Path, key: Any) -> Path:
    """Release 2's files under another version, signed with ``key``: never installed (the
    devices refuse it first), so it needs no wheel of its own."""
    bundle = out / version
    subprocess.run(["cp", "-al", str(releases.bundles[V2]), str(bundle)], check=True)
    manifest = rm.parse_manifest((bundle / rm.MANIFEST).read_bytes())
    for name in ("VERSION", rm.MANIFEST, rm.SIGNATURE):
        (bundle / name).unlink()  # hard links: never write through to release 2's files
    (bundle / "VERSION").write_text(version + "\n")
    rm.write_manifest(bundle, version=version, platform=manifest.platform,
                      project_wheel=manifest.project_wheel)
    rm.sign_bundle(bundle, key)
    return bundle


@pytest.mark.timeout(1500)
def test_rollout_canary_then_fleet_revert_halts_refusals(fleet: Fleet, releases: Releases,
                                                         tmp_path: Path) -> None:
    canary, two, three = fleet.devices
    _wait(fleet, lambda: _running(fleet, V1), 240, "three devices heartbeating on release 1")

    # 1. release 2: canary first, then the others, each confirming by itself
    start = time.monotonic()
    fleet.start_rollout(V2, share=50)
    _wait(fleet, lambda: fleet.rollout()["stage"] == "done", 3 * TRIAL_S + 300,
          "release 2 confirmed by the whole fleet")
    took = time.monotonic() - start
    assert [d.current() for d in fleet.devices] == [V2, V2, V2]
    reports = fleet.reports(V2)
    confirmed = {d: at for d, state, at in reports if state == "confirmed"}
    assert set(confirmed) == set(DEVICES), reports
    started = {d: at for d, state, at in reversed(reports) if state == "downloading"}
    # nobody but the canary started before the canary confirmed
    assert all(started[d.name] > confirmed[canary.name] for d in (two, three)), reports
    for d in fleet.devices:
        states = [h["state"] for h in d.history() if h["version"] == V2]
        assert states[-4:] == ["downloading", "installing", "trial", "confirmed"], states
        downloading = next(h for h in d.history()
                           if h["version"] == V2 and h["state"] == "downloading")
        # only what changed: the project wheel and VERSION (the rest is on the card)
        assert downloading["total_bytes"] < 2_000_000, downloading
    print(f"release 2 on three devices in {took:.0f} s")

    # 2. the release that breaks the camera: the canary goes back by itself; the rollout halts
    fleet.start_rollout(BROKEN, share=100)
    _wait(fleet, lambda: fleet.rollout()["halted_at"] is not None, TRIAL_S + 300,
          "the broken release halting the rollout")
    rollout = fleet.rollout()
    assert rollout["halted_reason"].startswith(f"pi-canary reverted {BROKEN}"), rollout
    assert "camera" in rollout["halted_reason"]
    _wait(fleet, lambda: canary.current() == V2 and canary.history()[-1]["state"] == "reverted",
          60, "the canary back on release 2")
    time.sleep(15)  # three heartbeats more: nobody else is offered it
    assert [d.current() for d in fleet.devices] == [V2, V2, V2]
    assert {d for d, _, _ in fleet.reports(BROKEN)} == {"pi-canary"}
    _wait(fleet, lambda: _running(fleet, V2), 120, "the canary healthy on release 2 again")

    # 3. refused at the aggregator: a bundle with a changed byte, one signed by another key
    office = rm.load_private_key(releases.private_key.read_bytes())
    tampered = _fake_release(releases, "0.1.0+gtest4", tmp_path, office)
    wheel = rm.parse_manifest((tampered / rm.MANIFEST).read_bytes()).project_wheel
    data = bytearray((tampered / wheel).read_bytes())
    data[100] ^= 1
    (tampered / wheel).unlink()
    (tampered / wheel).write_bytes(bytes(data))
    code, out = fleet.cli("add", str(tampered))
    assert code == 1 and "sha256 differs" in out, out
    rogue_private, rogue_public = rm.generate_keypair()
    rogue = _fake_release(releases, "0.1.0+gtest5", tmp_path, rm.load_private_key(rogue_private))
    code, out = fleet.cli("add", str(rogue))
    assert code == 1 and "does not trust" in " ".join(out.split()), out

    # ... and at the device: a file changed at the aggregator after it was added
    (tmp_path / "0.1.0+gtest4").rename(tmp_path / "tampered-4")
    good4 = _fake_release(releases, "0.1.0+gtest4", tmp_path, office)
    code, out = fleet.cli("add", str(good4))
    assert code == 0, out
    entry = rm.parse_manifest((good4 / rm.MANIFEST).read_bytes()).by_path()["VERSION"]
    stored = fleet.agg.dir / "data" / "releases" / "files" / entry.sha256
    stored.write_bytes(stored.read_bytes().replace(b"4", b"9"))
    fleet.start_rollout("0.1.0+gtest4")
    _wait(fleet, lambda: fleet.rollout()["halted_at"] is not None, 120,
          "the tampered file refused by the canary")
    reason = fleet.rollout()["halted_reason"]
    assert reason.startswith("pi-canary refused 0.1.0+gtest4") and "sha256" in reason, reason
    # ... and a key the aggregator was told to trust but the cards do not
    (tmp_path / "rogue.pub").write_bytes(rogue_public)
    code, out = fleet.cli("trust", str(tmp_path / "rogue.pub"))
    assert code == 0, out
    code, out = fleet.cli("add", str(rogue))
    assert code == 0, out
    fleet.start_rollout("0.1.0+gtest5")
    _wait(fleet, lambda: fleet.rollout()["halted_at"] is not None, 120,
          "the foreign signature refused by the canary")
    reason = fleet.rollout()["halted_reason"]
    assert reason.startswith("pi-canary refused 0.1.0+gtest5"), reason
    assert "does not trust" in reason
    # nothing switched anywhere; nothing of them was installed
    assert [d.current() for d in fleet.devices] == [V2, V2, V2]
    assert not (canary.prefix / "releases" / "0.1.0+gtest4").exists()
    assert not (canary.prefix / "releases" / "0.1.0+gtest5").exists()
    assert {d for d, _, _ in fleet.reports("0.1.0+gtest4")} == {"pi-canary"}
