"""Releases at the aggregator: trusted keys, verified bundles served by sha256 (resumable),
the staged rollout the heartbeat reply carries, devices' reports halting or advancing it, the
CLI, and refusals (unauthenticated, malformed, tampered)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cloud_sync import release_manifest as rm
from cloud_sync.aggregator.cli import app as cli
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.services import releases as svc
from cloud_sync.aggregator.services.common import ServiceError
from cloud_sync.aggregator.services.devices import add_device
from tests.cloud_sync.aggregator.conftest import World
from tests.cloud_sync.test_release_manifest import WHEEL, small_bundle

V1 = "1.0+gaaaa"


@pytest.fixture
def office(tmp_path: Path) -> tuple[Path, Any]:
    """A bundle signed with the office's key, and the key (public file, private key)."""
    private, public = rm.generate_keypair()
    (tmp_path / "office.pub").write_bytes(public)
    (tmp_path / "office.key").write_bytes(private)
    bundle = small_bundle(tmp_path / "bundle", V1)
    rm.sign_bundle(bundle, rm.load_private_key(private))
    return bundle, public


def heartbeat(world: World, device_id: str, room: str, version: str = "0.9",
              update: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "device_id": device_id, "room_id": room,
                            "software_version": version,
                            "sent_at": datetime.now(UTC).isoformat(), "uptime_s": 5,
                            "outbox_depth": 0}
    if update is not None:
        body["update"] = update
    headers = headers or (world.device if device_id == world.device_id else world.other)
    r = world.client.post("/api/v1/heartbeat", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def report(state: str, version: str = V1, reason: str | None = None) -> dict[str, Any]:
    return {"v": 1, "state": state, "version": version, "running": "0.9", "reason": reason,
            "at": datetime.now(UTC).isoformat()}


def test_release_served_and_rolled_out(world: World, sessions: Any,
                                       settings: AggregatorSettings,
                                       office: tuple[Path, bytes]) -> None:
    bundle, public = office
    c = world.client
    with sessions() as session:
        with pytest.raises(ServiceError, match="no trusted release key"):
            svc.add_release(session, settings, bundle, "test")
        svc.trust_key(session, public, "test")
        row = svc.add_release(session, settings, bundle, "test")
        assert (row.version, row.files) == (V1, 6)
        # the same bundle again: nothing changes
        assert svc.add_release(session, settings, bundle, "test").version == V1
    # no rollout yet: nothing offered, no release in the heartbeat reply
    assert c.get("/api/v1/releases/assigned", headers=world.device).status_code == 204
    assert heartbeat(world, "pi-301", "LAB-301").get("release") is None

    # the signed manifest and signature, byte for byte; every file by sha256, resumable
    r = c.get(f"/api/v1/releases/{V1}/manifest.json", headers=world.device)
    assert r.content == (bundle / rm.MANIFEST).read_bytes()
    r = c.get(f"/api/v1/releases/{V1}/manifest.sig", headers=world.device)
    assert r.content == (bundle / rm.SIGNATURE).read_bytes()
    manifest = rm.parse_manifest((bundle / rm.MANIFEST).read_bytes())
    wheel = manifest.by_path()[WHEEL]
    url = f"/api/v1/releases/files/{wheel.sha256}"
    whole = (bundle / WHEEL).read_bytes()
    r = c.get(url, headers=world.device)
    assert r.status_code == 200 and r.content == whole
    r = c.get(url, headers={**world.device, "Range": "bytes=300-"})
    assert r.status_code == 206 and r.content == whole[300:]
    assert r.headers["content-range"] == f"bytes 300-{len(whole) - 1}/{len(whole)}"
    assert c.get(url).status_code == 401  # device key or admin token only
    assert c.get(url, headers={**world.device, "Range": f"bytes={len(whole) + 5}-"}
                 ).status_code == 416
    assert c.get(f"/api/v1/releases/files/{'0' * 64}", headers=world.device).status_code == 404
    assert c.get("/api/v1/releases/files/../../etc", headers=world.device).status_code in (
        404, 422)

    # the rollout: canary room LAB-301 first; no share; then all
    assert c.post("/api/v1/releases/rollout", json={"version": V1, "canary_room": "LAB-301"},
                  headers=world.device).status_code == 403
    r = c.post("/api/v1/releases/rollout", json={"version": V1, "canary_room": "LAB-301",
                                                 "share_pct": 0}, headers=world.admin)
    assert r.status_code == 201, r.text
    assert r.json()["stage"] == "canary"
    offer = heartbeat(world, "pi-301", "LAB-301")["release"]
    assert offer["version"] == V1 and offer["allowed_now"] is True
    assert offer["files_url"] == "/api/v1/releases/files/"
    assert heartbeat(world, "pi-302", "LAB-302").get("release") is None  # not yet
    assert c.get("/api/v1/releases/assigned", headers=world.other).status_code == 204
    # a second canary on trial heartbeats with the new version: not a confirmation; the
    # first one's confirmation does not end the stage
    with sessions() as session:
        _, key = add_device(session, "LAB-301", "pi-301b")
    second = {"Authorization": f"Bearer {key}"}
    assert heartbeat(world, "pi-301b", "LAB-301", version=V1, update=report("trial"),
                     headers=second).get("release") is None
    heartbeat(world, "pi-301", "LAB-301", update=report("confirmed"))
    assert c.get("/api/v1/releases", headers=world.admin).json()["rollouts"][0]["stage"] == \
        "canary"
    assert heartbeat(world, "pi-302", "LAB-302").get("release") is None
    # the second canary confirms too (its report in the heartbeat): the rollout reaches all
    heartbeat(world, "pi-301b", "LAB-301", version=V1, update=report("confirmed"),
              headers=second)
    assert c.get("/api/v1/releases", headers=world.admin).json()["rollouts"][0]["stage"] == "all"
    assert heartbeat(world, "pi-301", "LAB-301", version=V1).get("release") is None
    assert c.get("/api/v1/releases/assigned", headers=world.other).json()["version"] == V1
    # the other device reverts: the rollout halts, saying where and why
    r = c.post("/api/v1/releases/report", headers=world.other,
               json=report("reverted", reason="camera unhealthy"))
    assert r.status_code == 202 and r.json() == {"stored": True}
    rollout = c.get("/api/v1/releases", headers=world.admin).json()["rollouts"][0]
    assert rollout["halted_at"] is not None
    assert "pi-302" in rollout["halted_reason"] and "camera" in rollout["halted_reason"]
    assert heartbeat(world, "pi-302", "LAB-302").get("release") is None
    assert c.get("/api/v1/releases/assigned", headers=world.other).status_code == 204
    # resumed by an admin: offered again
    assert c.post("/api/v1/releases/rollout/resume", headers=world.admin).status_code == 200
    assert heartbeat(world, "pi-302", "LAB-302")["release"]["version"] == V1
    # the device's history, newest first
    with sessions() as session:
        views = svc.device_updates(session, ["pi-301", "pi-302"])
    assert views["pi-301"].state == "confirmed"
    assert [h.state for h in views["pi-302"].history] == ["reverted"]


def test_malformed_and_unauthorised(world: World, sessions: Any) -> None:
    c = world.client
    bad = [("/api/v1/releases/rollout", {"version": "../x", "canary_room": "LAB-301"}),
           ("/api/v1/releases/rollout", {"version": V1, "canary_room": "LAB-301",
                                         "share_pct": 101}),
           ("/api/v1/releases/rollout", {"version": V1, "canary_room": "LAB-301",
                                         "surprise": 1}),
           ("/api/v1/releases/rollout/halt", {"reason": ""})]
    for path, body in bad:
        r = c.post(path, json=body, headers=world.admin)
        assert r.status_code == 422, (path, body, r.text)
    r = c.post("/api/v1/releases/rollout", json={"version": V1, "canary_room": "LAB-301"},
               headers=world.admin)
    assert r.status_code == 404 and "does not exist" in r.json()["detail"]
    assert c.post("/api/v1/releases/rollout/halt", json={"reason": "x"},
                  headers=world.admin).status_code == 404  # no rollout
    for body in (b"{", b"[]", json.dumps({**report("confirmed"), "state": "exploded"}).encode(),
                 json.dumps({**report("confirmed"), "at": "yesterday"}).encode()):
        r = c.post("/api/v1/releases/report", content=body, headers=world.device)
        assert r.status_code == 422, (body, r.text)
    assert c.post("/api/v1/releases/report", json=report("confirmed")).status_code == 401
    assert c.post("/api/v1/releases/report", json=report("confirmed"),
                  headers=world.admin).status_code == 403
    assert c.get("/api/v1/releases", headers=world.device).status_code == 403
    assert c.get("/api/v1/releases/no such/manifest.json", headers=world.device
                 ).status_code in (404, 422)


def test_class_time_and_share(world: World, sessions: Any, settings: AggregatorSettings,
                              office: tuple[Path, bytes]) -> None:
    bundle, public = office
    with sessions() as session:
        svc.trust_key(session, public, "test")
        svc.add_release(session, settings, bundle, "test")
        with pytest.raises(ServiceError, match="no device in canary room"):
            svc.start_rollout(session, V1, "NOWHERE", 10, "test")
        svc.start_rollout(session, V1, "LAB-301", 100, "test")
        found = svc.snapshot(session)
        # CS101 is in LAB-301 on Mondays 09:00-10:30: not during class, unless told
        during = world.at(0, 9, 30)
        offer = svc.offer_for(session, found, "pi-301", "LAB-301", "0.9", during)
        assert offer is not None and not offer.allowed_now
        assert "CS101" in (offer.window_reason or "")
        after = world.at(0, 10, 31)
        assert svc.offer_for(session, found, "pi-301", "LAB-301", "0.9", after).allowed_now  # type: ignore[union-attr]
        # share 100: the second stage names every device
        assert svc.stage_of(found, "pi-302", "LAB-302") == "share"  # type: ignore[arg-type]
        assert svc.offer_for(session, found, "pi-302", "LAB-302", "0.9") is None
        svc.promote_rollout(session, "test")
        found = svc.snapshot(session)
        assert svc.offer_for(session, found, "pi-302", "LAB-302", "0.9") is not None
        # buckets are spread and stable
        buckets = [svc.bucket(V1, f"dev-{i}") for i in range(1000)]
        assert 400 < sum(b < 50 for b in buckets) < 600
        assert buckets == [svc.bucket(V1, f"dev-{i}") for i in range(1000)]
        rollout = svc.start_rollout(session, V1, "LAB-302", 0, "test", during_class=True)
        assert rollout.stage == "canary"
        offer = svc.offer_for(session, svc.snapshot(session), "pi-302", "LAB-302", "0.9",
                              world.at(0, 9, 30) + timedelta(days=0))
        assert offer is not None and offer.allowed_now
        assert len([r for r in svc.list_rollouts(session) if r.active]) == 1


def test_cli_keys_add_and_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGGREGATOR_DATABASE_URL", f"sqlite:///{tmp_path / 'agg.db'}")
    monkeypatch.setenv("AGGREGATOR_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli, ["releases", *args])
        return result.exit_code, result.output

    code, out = run("keygen", "--out", str(tmp_path / "office"))
    assert code == 0, out
    bundle = small_bundle(tmp_path / "bundle", V1)
    code, out = run("add", str(bundle))
    assert code == 1 and "no trusted release key" in out
    code, out = run("trust", str(tmp_path / "office" / "release-signing.key"))
    assert code == 1 and "private key" in out
    code, out = run("trust", str(tmp_path / "office" / "release-signing.pub"))
    assert code == 0 and "trusted release key" in out, out
    code, out = run("add", str(bundle))  # unsigned
    assert code == 1 and "unsigned" in out, out
    assert run("sign", str(bundle), "--key",
               str(tmp_path / "office" / "release-signing.key"))[0] == 0
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    (tampered / WHEEL).write_bytes(b"evil" + (bundle / WHEEL).read_bytes()[4:])
    code, out = run("add", str(tampered))
    assert code == 1 and "sha256 differs" in out, out
    other_private, _ = rm.generate_keypair()
    wrong = tmp_path / "wrong"
    shutil.copytree(bundle, wrong)
    rm.sign_bundle(wrong, rm.load_private_key(other_private))
    code, out = run("add", str(wrong))
    assert code == 1 and "does not trust" in out.replace("\n", " "), out
    code, out = run("add", str(bundle))
    assert code == 0 and f"release {V1}: 6 files" in out, out
    code, out = run("add", str(tmp_path / "nothing"))
    assert code == 1 and "not a bundle" in out
    code, out = run("rollout", V1, "--canary-room", "LAB-301")
    assert code == 1 and "no device in canary room" in out, out
    code, out = run("list")
    assert code == 0 and f"release {V1}" in out


def test_console_devices_page(world: World, sessions: Any, settings: AggregatorSettings,
                              office: tuple[Path, bytes]) -> None:
    from cloud_sync.aggregator.console import accounts
    from tests.cloud_sync.aggregator.console_helpers import csrf_of, login

    bundle, public = office
    password = "correct horse battery"
    with sessions() as session:
        accounts.add_user(session, "office", "admin", password)
        accounts.add_user(session, "lee", "teacher", password, ["CS101"])
        svc.trust_key(session, public, "test")
        svc.add_release(session, settings, bundle, "test")
        svc.start_rollout(session, V1, "LAB-301", 0, "test")
    c = world.client
    heartbeat(world, "pi-301", "LAB-301", update=report("trial"))
    c.post("/api/v1/releases/report", headers=world.device,
           json=report("reverted", reason="camera offline: no frames"))
    assert login(c, "office", password).status_code in (200, 303)
    page = c.get("/devices")
    assert page.status_code == 200
    text = page.text
    assert f"Rollout of {V1}: halted" in text
    assert "pi-301 reverted" in text and "camera offline" in text
    assert f"reverted {V1}" in text and f"trial {V1}" in text  # the device's history
    assert f"<strong>{V1}</strong>: 6 files" in text
    # resume from the console (CSRF checked), then halt again with a reason
    r = c.post("/releases/rollout/resume", data={"csrf": csrf_of(text)},
               follow_redirects=False)
    assert r.status_code == 303, r.text
    text = c.get("/devices").text
    assert f"Rollout of {V1}: canary" in text
    assert c.post("/releases/rollout/halt", data={"reason": "x"},
                  follow_redirects=False).status_code in (400, 403)  # no CSRF token
    r = c.post("/releases/rollout/halt", data={"csrf": csrf_of(text), "reason": "wait"},
               follow_redirects=False)
    assert r.status_code == 303
    assert "halted by console:office: wait" in c.get("/devices").text
    r = c.post("/releases/rollout/explode", data={"csrf": csrf_of(text)},
               follow_redirects=False)
    assert r.status_code == 400 and "unknown rollout action" in r.text
    c.post("/logout", data={"csrf": csrf_of(text)})
    assert login(c, "lee", password).status_code in (200, 303)
    text = c.get("/").text
    r = c.post("/releases/rollout/resume", data={"csrf": csrf_of(text)},
               follow_redirects=False)
    assert r.status_code == 403


def test_devices_page_in_chromium(tmp_path: Path, office: tuple[Path, bytes]) -> None:
    """The Devices page with a halted rollout, at desktop and phone width (no horizontal
    scroll at 390 px); screenshots in test-output/console/releases."""
    from cloud_sync.aggregator import config as aggregator_config
    from cloud_sync.aggregator.console import accounts
    from cloud_sync.aggregator.db.models import Room
    from cloud_sync.aggregator.services.common import utcnow
    from tests.cloud_sync.aggregator.console_helpers import live_aggregator, shoot, submit
    from tests.conftest import REPO, require
    from tests.support.chromium import Chromium, chromium_binary

    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    bundle, public = office
    settings = aggregator_config.load(None, database_url=f"sqlite:///{tmp_path / 'a.db'}",
                                      data_dir=tmp_path / "data", rate_limit_per_min=100000)
    password = "correct horse battery"
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        with app.state.ctx.sessions() as session:
            accounts.add_user(session, "office", "admin", password)
            for room in ("LAB-301", "LAB-302"):
                session.add(Room(id=room, name=room, site="north", timezone="UTC",
                                 created_at=utcnow()))
            session.commit()
            for name, room in (("pi-lab-301", "LAB-301"), ("pi-lab-302", "LAB-302"),
                               ("pi-lab-302-b", "LAB-302")):
                add_device(session, room, name)
            svc.trust_key(session, public, "office")
            svc.add_release(session, settings, bundle, "cli:office")
            svc.start_rollout(session, V1, "LAB-301", 50, "cli:office")
            at = datetime.now(UTC)
            for state in ("downloading", "installing", "trial"):
                svc.record_report(session, "pi-lab-301", svc.UpdateReport(
                    state=state, version=V1, running="0.9", at=at))  # type: ignore[arg-type]
                at += timedelta(seconds=5)
            svc.record_report(session, "pi-lab-301", svc.UpdateReport(
                state="reverted", version=V1, running="0.9", at=at,  # type: ignore[arg-type]
                reason="not healthy within 180 s: camera unhealthy: camera failed"))
        browser.navigate(f"{url}/login")
        submit(browser, "form[action='/login']", {"name": "office", "password": password})
        browser.navigate(f"{url}/devices")
        text = browser.evaluate("document.body.innerText")
        assert f"Rollout of {V1}: halted" in text
        assert "pi-lab-301 reverted" in text and "camera failed" in text
        shoot(browser, REPO / "test-output" / "console" / "releases", "devices-rollout")
