"""The device pulls its release (appliance.update.updater) from a real aggregator app (in
process, SQLite): only the files it lacks, resumable, bounded, verified; then the one install/
trial/confirm-or-revert path of make deploy. The refusals (a tampered file at the aggregator,
a signature by a key the device does not trust, a full disk) switch nothing and halt the
rollout; during class time the device waits.

Small bundles with a small installer, as in test_update_manager (the real install-release.sh
runs in tests/fleet/test_update_rollout.py)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance import config as appliance_config
from appliance.update import manager as mgr
from appliance.update import updater as upd
from appliance.update.manager import ReleaseManager
from appliance.update.state import read_history
from appliance.update.updater import Throttle, Updater
from cloud_sync import release_manifest as rm
from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.services import releases as svc
from cloud_sync.aggregator.services.devices import add_device, create_admin_token
from cloud_sync.protocol import UpdateReport
from tests.appliance.test_update_manager import Appliance, make_bundle


@dataclass
class Fleet:
    client: TestClient
    admin: dict[str, str]
    device_key: str
    sessions: Any
    settings: Any
    private: Any
    tmp: Path

    def add(self, version: str, key: Any = None) -> Path:
        bundle = make_bundle(self.tmp / f"bundle-{version}", version, key or self.private)
        with self.sessions() as session:
            svc.add_release(session, self.settings, bundle, "test")
        return bundle

    def rollout(self, version: str, **extra: Any) -> dict[str, Any]:
        r = self.client.post("/api/v1/releases/rollout", headers=self.admin,
                             json={"version": version, "canary_room": "LAB-301", **extra})
        assert r.status_code == 201, r.text
        svc_cache = self.client.app.state.ctx.extra.get("release_snapshot")  # type: ignore[attr-defined]
        if svc_cache is not None:
            svc_cache.clear()
        return r.json()  # type: ignore[no-any-return]

    def rollouts(self) -> list[dict[str, Any]]:
        r = self.client.get("/api/v1/releases", headers=self.admin)
        return r.json()["rollouts"]  # type: ignore[no-any-return]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    settings = aggregator_config.load(None, database_url=f"sqlite:///{tmp_path / 'agg.db'}",
                                      data_dir=tmp_path / "agg", rate_limit_per_min=100000)
    with TestClient(create_app(settings)) as client:
        sessions = client.app.state.ctx.sessions  # type: ignore[attr-defined]
        private, public = rm.generate_keypair()
        (tmp_path / "office.pub").write_bytes(public)
        with sessions() as session:
            _, token = create_admin_token(session, "tests")
        admin = {"Authorization": f"Bearer {token}"}
        assert client.post("/api/v1/rooms", json={"id": "LAB-301", "site": "north"},
                           headers=admin).status_code == 201
        with sessions() as session:
            _, key = add_device(session, "LAB-301", "pi-301")
            svc.trust_key(session, public, "test")
        yield Fleet(client, admin, key, sessions, settings, rm.load_private_key(private),
                    tmp_path)


@pytest.fixture
def device(tmp_path: Path, fleet: Fleet,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Updater, Appliance]]:
    monkeypatch.setattr(mgr, "PROBE_EVERY_S", 0.05)
    keys = tmp_path / "device-keys"
    keys.mkdir()
    shutil.copy(tmp_path / "office.pub", keys / "office.pub")
    prefix = tmp_path / "opt"
    app = Appliance(prefix)
    (tmp_path / "units").mkdir()
    settings = appliance_config.load(None, web={"port": app.port}, device={
        "device_id": "pi-301", "room_id": "LAB-301"}, sync={
        "aggregator_url": "http://testserver", "api_key": fleet.device_key}, update={
        "prefix": prefix, "keys_dir": keys, "units_dir": tmp_path / "units", "systemctl": "",
        "restart_command": f"touch {tmp_path}/restarted", "confirm_command": "",
        "min_free_mb": 0, "request_file": None})
    device_client = TestClient(fleet.client.app,
                               headers={"Authorization": f"Bearer {fleet.device_key}"})

    def report(item: UpdateReport) -> None:
        r = device_client.post("/api/v1/releases/report", content=item.model_dump_json())
        assert r.status_code == 202, r.text

    manager = ReleaseManager(settings, reporter=report, trial_s=1.0)
    # release 1.0 as flashed: installed, its bundle kept
    assert manager.apply(make_bundle(tmp_path / "flashed", "1.0", fleet.private)).state == \
        "confirmed"
    yield Updater(settings, manager=manager, client=device_client), app
    app.server.shutdown()


def states(updater: Updater) -> list[tuple[str, str | None]]:
    return [(r.state, r.version) for r in read_history(updater.manager.layout)]


def test_pull_only_what_is_missing_then_confirm(fleet: Fleet, device: tuple) -> None:
    updater, _ = device
    assert updater.check() is None  # no rollout: nothing offered
    bundle = fleet.add("2.0")
    fleet.rollout("2.0", share_pct=0)
    # an interrupted download left half the project wheel: the rest is fetched with Range
    manifest = rm.parse_manifest((bundle / rm.MANIFEST).read_bytes())
    wheel = manifest.project_wheel
    half = (bundle / wheel).read_bytes()[:70]
    part = updater.manager.layout.download / "2.0" / (wheel + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(half)
    ranges: list[str] = []
    real_stream = updater.client.stream

    def spy(method: str, url: str, **kw: Any) -> Any:
        ranges.append((kw.get("headers") or {}).get("Range", ""))
        return real_stream(method, url, **kw)

    updater.client.stream = spy  # type: ignore[method-assign]
    outcome = updater.check()
    assert outcome is not None and (outcome.state, outcome.version) == ("confirmed", "2.0")
    assert updater.manager.current() == "2.0"
    # only the files 1.0 did not have: the project wheel (resumed at byte 70) and VERSION;
    # the dependency wheel and the model came from the kept bundle
    assert sorted(ranges) == ["", "bytes=70-"]
    downloading = [r for r in read_history(updater.manager.layout) if r.state == "downloading"]
    assert downloading[0].total_bytes == manifest.by_path()[wheel].size + len(b"2.0\n")
    assert states(updater)[-4:] == [("downloading", "2.0"), ("installing", "2.0"),
                                    ("trial", "2.0"), ("confirmed", "2.0")]
    # the aggregator heard it: the rollout finished (one device in the fleet)
    assert fleet.rollouts()[0]["stage"] == "done"
    assert updater.check() is None  # running it: nothing more to do


def test_tampered_file_refused_nothing_switched_rollout_halted(fleet: Fleet,
                                                               device: tuple) -> None:
    updater, _ = device
    bundle = fleet.add("2.0")
    manifest = rm.parse_manifest((bundle / rm.MANIFEST).read_bytes())
    stored = svc.files_dir(fleet.settings) / manifest.by_path()[manifest.project_wheel].sha256
    stored.write_bytes(b"X" + stored.read_bytes()[1:])  # changed at the aggregator
    fleet.rollout("2.0")
    outcome = updater.check()
    assert outcome is not None and outcome.state == "refused"
    assert "sha256 differs" in str(outcome.reason)
    assert updater.manager.current() == "1.0"
    assert not (updater.manager.layout.releases / "2.0").exists()
    rollout = fleet.rollouts()[0]
    assert rollout["halted_at"] and "pi-301 refused 2.0" in rollout["halted_reason"]
    # a refused release is not tried again (and no longer offered)
    assert updater.check() is None


def test_untrusted_signature_and_full_disk_refused(fleet: Fleet, device: tuple,
                                                   tmp_path: Path) -> None:
    updater, _ = device
    # signed by a key the aggregator trusts but the device does not
    other_private, other_public = rm.generate_keypair()
    with fleet.sessions() as session:
        svc.trust_key(session, other_public, "test")
    fleet.add("2.0", key=rm.load_private_key(other_private))
    fleet.rollout("2.0")
    outcome = updater.check()
    assert outcome is not None and outcome.state == "refused"
    assert "does not trust" in str(outcome.reason)
    assert updater.manager.current() == "1.0"
    # a full disk: refused before a byte of the release is downloaded
    fleet.add("3.0")
    fleet.rollout("3.0")
    object.__setattr__(updater.manager.cfg, "min_free_mb", 10**5)  # 100 GB must stay free
    outcome = updater.check()
    assert outcome is not None and outcome.state == "refused", outcome
    assert "disk" in str(outcome.reason)
    assert updater.manager.current() == "1.0"
    assert not list((updater.manager.layout.download / "3.0").glob("wheels/*"))


def test_waits_for_class_to_end(fleet: Fleet, device: tuple) -> None:
    updater, _ = device
    fleet.add("2.0")
    now = datetime.now(UTC)
    start, end = (now - timedelta(minutes=5)).time(), (now + timedelta(minutes=30)).time()
    if end < start:
        pytest.skip("the class would cross midnight")
    assert fleet.client.post("/api/v1/courses", json={"id": "CS101", "name": "CS"},
                             headers=fleet.admin).status_code == 201
    r = fleet.client.post("/api/v1/schedules", headers=fleet.admin, json={
        "course_id": "CS101", "room_id": "LAB-301", "weekday": now.weekday(),
        "start_time": start.strftime("%H:%M"), "end_time": end.strftime("%H:%M")})
    assert r.status_code == 201, r.text
    fleet.rollout("2.0")
    outcome = updater.check()
    assert outcome is not None and outcome.state == "waiting"
    assert "CS101" in str(outcome.reason)
    assert updater.check() is not None
    assert [s for s in states(updater) if s[0] == "waiting"] == [("waiting", "2.0")]
    assert updater.manager.current() == "1.0"
    # told to go ahead anyway (appliance update check --now)
    outcome = updater.check(ignore_window=True)
    assert outcome is not None and outcome.state == "confirmed"


def test_offer_urls_stay_on_the_aggregator(fleet: Fleet, device: tuple) -> None:
    from cloud_sync.protocol import ReleaseOffer

    updater, _ = device
    for url in ("http://evil.example/x", "//evil.example/x", "/api/v1/../../x"):
        offer = ReleaseOffer(version="2.0", manifest_url=url, signature_url="/api/v1/s",
                             files_url="/api/v1/releases/files/", allowed_now=True)
        outcome = updater.check(offer)
        assert outcome is not None and outcome.state == "failed"
        assert "not on the aggregator" in str(outcome.reason)
    assert updater.manager.current() == "1.0"


def test_throttle_bounds_the_rate() -> None:
    throttle = Throttle(200_000)
    start = time.monotonic()
    for _ in range(10):
        throttle.take(10_000)
    assert time.monotonic() - start >= 0.45
    assert upd.CHUNK <= 64 * 1024


def test_security_reboot_only_outside_class_time(fleet: Fleet, tmp_path: Path) -> None:
    from appliance.update.reboot import reboot_if_needed

    flag = tmp_path / "reboot-required"
    rebooted = tmp_path / "rebooted"
    settings = appliance_config.load(None, device={"device_id": "pi-301", "room_id": "LAB-301"},
                                     sync={"aggregator_url": "http://testserver",
                                           "api_key": fleet.device_key},
                                     update={"reboot_required_file": flag,
                                             "reboot_command": f"touch {rebooted}"})
    http = TestClient(fleet.client.app,
                      headers={"Authorization": f"Bearer {fleet.device_key}"})
    # a fixed hour of today (the device asks for the room's classes "at" the time it is given):
    # the test's class, an hour later, never crosses midnight (it was skipped from 22:00 UTC)
    now = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
    assert reboot_if_needed(settings, now, http) == "no reboot needed"
    flag.touch()
    assert fleet.client.post("/api/v1/courses", json={"id": "CS101", "name": "CS"},
                             headers=fleet.admin).status_code == 201
    # a class from an hour from now: now is free, 40 minutes before it too, 20 minutes not
    start = now + timedelta(hours=1)
    r = fleet.client.post("/api/v1/schedules", headers=fleet.admin, json={
        "course_id": "CS101", "room_id": "LAB-301", "weekday": now.weekday(),
        "start_time": start.strftime("%H:%M"),
        "end_time": (start + timedelta(hours=1)).strftime("%H:%M")})
    assert r.status_code == 201, r.text
    waiting = reboot_if_needed(settings, start - timedelta(minutes=20), http)
    assert "class CS101" in waiting and not rebooted.exists()
    assert "class CS101" in reboot_if_needed(settings, start + timedelta(minutes=30), http)
    assert not rebooted.exists()
    # offline: it waits
    offline = TestClient(fleet.client.app, headers={"Authorization": "Bearer dk_wrong"})
    assert "waiting" in reboot_if_needed(settings, now, offline)
    assert not rebooted.exists()
    assert reboot_if_needed(settings, start - timedelta(minutes=40), http) == \
        "rebooting for a security update"
    assert rebooted.exists()
