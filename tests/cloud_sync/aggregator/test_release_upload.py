"""Releases from the console (issue 27 item 1): a signed bundle uploaded as a .tar/.tar.gz is
streamed to disk, unpacked with every member checked, verified as `aggregator releases add`
does and stored; refusals (tampered, untrusted key, path traversal, links, too large, a
teacher, no CSRF token) say why and store nothing; the "Start a rollout" form keeps its input
and says why beside the field. `releases sign --archive` makes the archive."""

from __future__ import annotations

import html
import io
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cloud_sync import release_archive as ra
from cloud_sync import release_manifest as rm
from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.cli import app as cli
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.console import accounts
from cloud_sync.aggregator.db.models import AuditLog, Release, Rollout
from cloud_sync.aggregator.services import releases as svc
from tests.cloud_sync.aggregator.conftest import World
from tests.cloud_sync.test_release_manifest import WHEEL, small_bundle

from .console_helpers import csrf_of, login

V1 = "1.0+gupload"
PW = "correct horse battery"
LIMIT = 1_000_000  # release_upload_max_bytes in these tests (its lower bound)


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> AggregatorSettings:
    return aggregator_config.load(None, database_url=db_url, data_dir=tmp_path / "data",
                                  rate_limit_per_min=100000, release_upload_max_bytes=LIMIT)


@pytest.fixture
def office(tmp_path: Path) -> tuple[Path, bytes, Any]:
    """A signed bundle, the office's public key (PEM) and private key."""
    private_pem, public = rm.generate_keypair()
    private = rm.load_private_key(private_pem)
    bundle = small_bundle(tmp_path / "office" / "bundle", V1)
    rm.sign_bundle(bundle, private)
    return bundle, public, private


def _admin(world: World, sessions: Any, public: bytes | None = None) -> str:
    with sessions() as session:
        accounts.add_user(session, "office", "admin", PW)
        accounts.add_user(session, "lee", "teacher", PW, ["CS101"])
        if public is not None:
            svc.trust_key(session, public, "test")
    assert login(world.client, "office", PW).status_code in (200, 303)
    return csrf_of(world.client.get("/devices").text)


def upload(world: World, token: str, archive: Path | bytes, name: str = "release.tar",
           **kw: Any) -> Any:
    data = archive.read_bytes() if isinstance(archive, Path) else archive
    return world.client.post("/releases/add", data={"csrf": token},
                             files={"bundle": (name, data, "application/x-tar")},
                             follow_redirects=False, **kw)


def stored(settings: AggregatorSettings) -> list[str]:
    store = svc.files_dir(settings)
    return sorted(p.name for p in store.iterdir()) if store.is_dir() else []


def leftovers(settings: AggregatorSettings) -> list[Path]:
    incoming = svc.incoming_dir(settings)
    return list(incoming.rglob("*")) if incoming.is_dir() else []


def nothing_stored(sessions: Any, settings: AggregatorSettings) -> None:
    with sessions() as session:
        assert session.scalars(select(Release)).all() == []
    assert stored(settings) == []
    assert leftovers(settings) == []  # the upload and its unpacked copy are gone


def refusal(page: str) -> str:
    found = re.search(r'<span class="field-error" id="err-bundle">([^<]*)</span>', page)
    assert found, page[-3000:]
    return html.unescape(found.group(1))


def test_good_archive_is_added_and_stored_by_sha256(world: World, sessions: Any,
                                                    settings: AggregatorSettings,
                                                    office: tuple[Path, bytes, Any],
                                                    tmp_path: Path) -> None:
    bundle, public, _ = office
    token = _admin(world, sessions, public)
    archive = tmp_path / "release.tar.gz"
    assert ra.write_archive(bundle, archive) == 6
    r = upload(world, token, archive, "release.tar.gz")
    assert r.status_code == 303, r.text
    page = world.client.get(r.headers["location"]).text
    assert f"release {V1} added from release.tar.gz: 6 files" in page
    assert f'<li id="release-{V1}"><strong>{V1}</strong>: 6 files' in page
    manifest = rm.parse_manifest((bundle / rm.MANIFEST).read_bytes())
    assert stored(settings) == sorted({f.sha256 for f in manifest.files})
    for entry in manifest.files:
        assert (svc.files_dir(settings) / entry.sha256).read_bytes() == \
            (bundle / entry.path).read_bytes()
    assert leftovers(settings) == []
    with sessions() as session:
        row = session.get(Release, V1)
        assert row is not None and bytes(row.manifest) == (bundle / rm.MANIFEST).read_bytes()
        assert row.added_by == "console:office"
        assert session.scalars(select(AuditLog.action).where(
            AuditLog.action == "release.add")).all() == ["release.add"]
    # the same archive again: nothing changes; a plain .tar with the bundle in a folder too
    wrapped = tmp_path / "wrapped.tar"
    with tarfile.open(wrapped, "w") as tar:
        tar.add(bundle, arcname=f"bundle-{V1}")
    r = upload(world, token, wrapped)
    assert r.status_code == 303, r.text
    assert leftovers(settings) == []


def test_tampered_and_untrusted_archives_are_refused(world: World, sessions: Any,
                                                     settings: AggregatorSettings,
                                                     office: tuple[Path, bytes, Any],
                                                     tmp_path: Path) -> None:
    bundle, public, _ = office
    token = _admin(world, sessions, public)
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    (tampered / WHEEL).write_bytes(b"evil" + (bundle / WHEEL).read_bytes()[4:])
    ra.write_archive(tampered, tmp_path / "tampered.tar")
    r = upload(world, token, tmp_path / "tampered.tar")
    assert r.status_code == 400
    assert refusal(r.text) == (f"refused: {WHEEL}: changed since signing (sha256 differs "
                               "from the manifest). Nothing was stored.")
    nothing_stored(sessions, settings)

    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    other_private, _ = rm.generate_keypair()
    kid = rm.sign_bundle(other, rm.load_private_key(other_private))
    ra.write_archive(other, tmp_path / "other.tar")
    r = upload(world, token, tmp_path / "other.tar")
    assert r.status_code == 400
    assert refusal(r.text).startswith(
        f"refused: not signed by a trusted key (signed by key {kid}, which the aggregator "
        "does not trust")
    nothing_stored(sessions, settings)

    unsigned = tmp_path / "unsigned"
    shutil.copytree(bundle, unsigned)
    (unsigned / rm.SIGNATURE).unlink()
    with tarfile.open(tmp_path / "unsigned.tar", "w") as tar:
        tar.add(unsigned, arcname=".")
    r = upload(world, token, tmp_path / "unsigned.tar")
    assert r.status_code == 400 and "unsigned (manifest.sig missing)" in refusal(r.text)
    r = upload(world, token, b"this is not a tar file at all" * 20)
    assert r.status_code == 400 and "not a readable .tar or .tar.gz" in refusal(r.text)
    nothing_stored(sessions, settings)


def _evil(path: Path, bundle: Path, name: str, kind: bytes = tarfile.REGTYPE,
          link: str = "") -> Path:
    """The good bundle, then one bad member."""
    with tarfile.open(path, "w") as tar:
        tar.add(bundle, arcname=".")
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        data = b"owned\n" if kind == tarfile.REGTYPE else b""
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize(("name", "kind", "link", "reason"), [
    ("../x", tarfile.REGTYPE, "", "'../x': a path with '..'"),
    ("wheels/../../x", tarfile.REGTYPE, "", "a path with '..'"),
    ("ABSOLUTE", tarfile.REGTYPE, "", "an absolute path"),
    ("wheels/evil.whl", tarfile.SYMTYPE, "/etc/passwd", "a symbolic link (to '/etc/passwd')"),
    ("wheels/hard.whl", tarfile.LNKTYPE, "VERSION", "a hard link"),
    ("dev", tarfile.CHRTYPE, "", "a device"),
    ("fifo", tarfile.FIFOTYPE, "", "a FIFO"),
])
def test_unsafe_members_are_refused_before_anything_is_written_outside(
        world: World, sessions: Any, settings: AggregatorSettings,
        office: tuple[Path, bytes, Any], tmp_path: Path, name: str, kind: bytes, link: str,
        reason: str) -> None:
    bundle, public, _ = office
    token = _admin(world, sessions, public)
    outside = tmp_path / "outside-target"
    if name == "ABSOLUTE":
        name = reason_name = str(outside)
    else:
        reason_name = name
    archive = _evil(tmp_path / "evil.tar", bundle, name, kind, link)
    r = upload(world, token, archive)
    assert r.status_code == 400, r.text
    assert reason in refusal(r.text) and reason_name in refusal(r.text)
    assert not outside.exists()
    assert not (svc.incoming_dir(settings).parent / "x").exists()  # '../x' from incoming/*
    assert not (svc.incoming_dir(settings) / "x").exists()
    nothing_stored(sessions, settings)


def test_size_bounds_teacher_and_csrf(world: World, sessions: Any,
                                      settings: AggregatorSettings,
                                      office: tuple[Path, bytes, Any],
                                      tmp_path: Path) -> None:
    bundle, public, private = office
    token = _admin(world, sessions, public)
    big = tmp_path / "big"
    shutil.copytree(bundle, big)
    (big / "models" / "big.bin").write_bytes(bytes(range(256)) * 5000)  # 1.28 MB
    rm.write_manifest(big, version=V1, platform="native", project_wheel=WHEEL)
    rm.sign_bundle(big, private)
    ra.write_archive(big, tmp_path / "big.tar")
    # announced too large: refused before the body is read
    r = upload(world, token, tmp_path / "big.tar")
    assert r.status_code == 413
    assert refusal(r.text).startswith("the archive is larger than 1 MB, the most this "
                                      "aggregator takes (setting release_upload_max_bytes)")
    nothing_stored(sessions, settings)
    # no Content-Length (chunked): refused on the bytes received
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{token}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="bundle"; '
            f'filename="big.tar"\r\nContent-Type: application/x-tar\r\n\r\n').encode()
    body = head + (tmp_path / "big.tar").read_bytes() + f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    r = world.client.post("/releases/add", content=chunks(), follow_redirects=False,
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "larger than 1 MB" in refusal(r.text)
    nothing_stored(sessions, settings)
    # a small .tar.gz that unpacks past the bound (zeros compress to nothing)
    bomb = tmp_path / "bomb"
    shutil.copytree(bundle, bomb)
    (bomb / "models" / "zeros.bin").write_bytes(bytes(3 * LIMIT))
    rm.write_manifest(bomb, version=V1, platform="native", project_wheel=WHEEL)
    rm.sign_bundle(bomb, private)
    ra.write_archive(bomb, tmp_path / "bomb.tar.gz")
    assert (tmp_path / "bomb.tar.gz").stat().st_size < LIMIT / 10
    r = upload(world, token, tmp_path / "bomb.tar.gz")
    assert r.status_code == 400 and "more than 1 MB unpacked" in refusal(r.text)
    nothing_stored(sessions, settings)

    ra.write_archive(bundle, tmp_path / "good.tar")
    # the file before the CSRF token, or no token: 403, nothing kept
    r = world.client.post("/releases/add", files={"bundle": ("g.tar", b"x" * 100)},
                          follow_redirects=False)
    assert r.status_code == 403
    assert upload(world, "wrong-token", tmp_path / "good.tar").status_code == 403
    other = world.client.post("/releases/add", data={"csrf": token},
                              files={"other": ("x.tar", b"abc")}, follow_redirects=False)
    assert other.status_code == 400 and "one file only" in refusal(other.text)
    none = world.client.post("/releases/add", data={"csrf": token},
                             files={"bundle": ("", b"")}, follow_redirects=False)
    assert none.status_code == 422 and "choose the release's .tar" in refusal(none.text)
    nothing_stored(sessions, settings)
    # a teacher: 403 before anything is read or written
    world.client.post("/logout", data={"csrf": token})
    assert login(world.client, "lee", PW).status_code in (200, 303)
    teacher_token = csrf_of(world.client.get("/").text)
    r = upload(world, teacher_token, tmp_path / "good.tar")
    assert r.status_code == 403 and "administrators" in r.text
    assert world.client.post("/releases/rollout", data={
        "csrf": teacher_token, "version": V1, "canary_room": "LAB-301"},
        follow_redirects=False).status_code == 403
    nothing_stored(sessions, settings)
    # logged out: 401 before the body is read
    world.client.post("/logout", data={"csrf": teacher_token})
    assert upload(world, teacher_token, tmp_path / "good.tar").status_code == 401
    nothing_stored(sessions, settings)


def test_start_rollout_form(world: World, sessions: Any, settings: AggregatorSettings,
                            office: tuple[Path, bytes, Any]) -> None:
    bundle, public, _ = office
    token = _admin(world, sessions, public)
    c = world.client
    page = c.get("/devices").text
    assert 'id="start-rollout"' not in page  # no release held yet: nothing to roll out
    with sessions() as session:
        svc.add_release(session, settings, bundle, "test")
    page = c.get("/devices").text
    assert 'id="start-rollout"' in page and f'<option value="{V1}"' in page

    def post(**values: str) -> Any:
        return c.post("/releases/rollout", data={"csrf": token, **values},
                      follow_redirects=False)

    r = post(version=V1, canary_room="LAB-301", share_pct="150", during_class="yes",
             max_kb_per_s="5")
    assert r.status_code == 422
    assert 'id="err-share_pct">150 is out of range: a share from 0 to 100 %<' in r.text
    assert 'id="err-max_kb_per_s">5 is out of range: a cap from 10' in r.text
    assert 'value="150"' in r.text and 'value="5"' in r.text  # the input is kept
    assert '<option value="yes" selected>' in r.text
    r = post(version="9.9", canary_room="NOPE", share_pct="x")
    assert r.status_code == 422
    assert "there is no release &#39;9.9&#39;: add it first" in r.text
    assert "there is no room &#39;NOPE&#39;" in r.text and "is not a whole number" in r.text
    with sessions() as session:  # LAB-302's device moves away: nobody to be the canary
        from cloud_sync.aggregator.db.models import Device
        session.get(Device, "pi-302").room_id = "LAB-301"
        session.commit()
    r = post(version=V1, canary_room="LAB-302", share_pct="10")
    assert r.status_code == 422
    assert 'id="err-canary_room">no device in canary room &#39;LAB-302&#39;' in r.text
    assert '<option value="LAB-302" selected>' in r.text
    with sessions() as session:
        assert session.scalars(select(Rollout)).all() == []
    r = post(version=V1, canary_room="LAB-301", share_pct="10", during_class="no",
             max_kb_per_s="500")
    assert r.status_code == 303, r.text
    assert "rollout of 1.0+gupload started: canary room LAB-301 first, then 10%" in \
        c.get(r.headers["location"]).text
    with sessions() as session:
        row = session.scalars(select(Rollout)).one()
        assert (row.version, row.canary_room, row.share_pct, row.during_class,
                row.max_bytes_per_s, row.started_by) == (V1, "LAB-301", 10, False, 500_000,
                                                         "console:office")
    # the API sees the same rollout
    assert c.get("/api/v1/releases", headers=world.admin).json()["rollouts"][0]["stage"] in (
        "canary", "share", "all", "done")
    assert post(version=V1, canary_room="LAB-301").status_code == 303  # supersedes it
    assert 'data-confirm="Start this rollout? It replaces the rollout' in c.get("/devices").text
    assert c.post("/releases/rollout", data={"version": V1, "canary_room": "LAB-301"},
                  follow_redirects=False).status_code == 403  # no CSRF token


# -- the archive itself (no database) ---------------------------------------------------------

def test_sign_archive_option_round_trips(tmp_path: Path) -> None:
    private, public = rm.generate_keypair()
    (tmp_path / "k.key").write_bytes(private)
    (tmp_path / "k.pub").write_bytes(public)
    bundle = small_bundle(tmp_path / "bundle", V1)
    (bundle / "stray.txt").write_text("not in the manifest")
    runner = CliRunner()
    result = runner.invoke(cli, ["releases", "sign", str(bundle), "--key",
                                 str(tmp_path / "k.key"), "--archive",
                                 str(tmp_path / "out.tar")])
    assert result.exit_code == 1 and "stray.txt: in the bundle but not in the manifest" in \
        result.output
    (bundle / "stray.txt").unlink()
    for name in ("out.tar", "out.tar.gz"):
        result = runner.invoke(cli, ["releases", "sign", str(bundle), "--key",
                                     str(tmp_path / "k.key"), "--archive",
                                     str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert f"archive {tmp_path / name}: 6 files" in result.output
        with tarfile.open(tmp_path / name) as tar:
            members = tar.getmembers()
        assert members[0].name == rm.MANIFEST and members[1].name == rm.SIGNATURE
        assert all(m.isreg() and m.uid == 0 and m.uname == "" for m in members)
        out = ra.unpack(tmp_path / name, tmp_path / f"unpacked-{name}", max_bytes=10**6)
        manifest, signer = rm.verify_bundle(out, rm.load_public_keys([tmp_path / "k.pub"]))
        assert manifest.version == V1 and signer is not None
    assert (tmp_path / "out.tar.gz").stat().st_size < (tmp_path / "out.tar").stat().st_size
    assert not list(tmp_path.glob(".*.tmp"))
    unsigned = small_bundle(tmp_path / "unsigned", V1)
    with pytest.raises(rm.ReleaseError, match="unsigned"):
        ra.write_archive(unsigned, tmp_path / "u.tar")


def test_unpack_bounds_and_shapes(tmp_path: Path) -> None:
    bundle = small_bundle(tmp_path / "bundle", V1)
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tar:
        for i in range(12):
            info = tarfile.TarInfo(f"f{i}")
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ra.ArchiveError, match="more than 10 entries"):
        ra.unpack(many, tmp_path / "a", max_bytes=10**6, max_members=10)
    twice = tmp_path / "twice.tar"
    with tarfile.open(twice, "w") as tar:
        tar.add(bundle / "VERSION", arcname="VERSION")
        tar.add(bundle / "VERSION", arcname="./VERSION")
    with pytest.raises(ra.ArchiveError, match="in the archive twice"):
        ra.unpack(twice, tmp_path / "b", max_bytes=10**6)
    with pytest.raises(ra.ArchiveError, match=r"no manifest\.json at the top"):
        ra.unpack(many, tmp_path / "c", max_bytes=10**6)
    with pytest.raises(ra.ArchiveError, match="not empty"):
        ra.unpack(many, tmp_path / "c", max_bytes=10**6)
    cut = tmp_path / "cut.tar"
    with tarfile.open(cut, "w") as tar:
        tar.add(bundle, arcname=".")
    cut.write_bytes(cut.read_bytes()[:3000])
    with pytest.raises(ra.ArchiveError, match="cut short"):
        ra.unpack(cut, tmp_path / "d", max_bytes=10**6)
    for name in ("a\\b", "/abs", "x/../../y", "..", "./../y"):
        with pytest.raises(ra.ArchiveError):
            ra.member_path(name)
    assert ra.member_path("./") is None and str(ra.member_path("./a//b")) == "a/b"


# -- in Chromium --------------------------------------------------------------------------------

@pytest.mark.browser
@pytest.mark.slow(seconds=25)
def test_add_and_roll_out_in_chromium(tmp_path: Path, office: tuple[Path, bytes, Any]) -> None:
    """An administrator adds a release by choosing its archive in the Devices page and starts
    its rollout from the form (a refusal first: beside the field, the input kept); the page at
    1280 and 390 px without horizontal scroll; screenshots in test-output/console/releases."""
    from cloud_sync.aggregator.db.models import Room
    from cloud_sync.aggregator.services.common import utcnow
    from cloud_sync.aggregator.services.devices import add_device
    from tests.conftest import REPO, require
    from tests.support.chromium import Chromium, chromium_binary

    from .console_helpers import live_aggregator, set_files, shoot, submit

    binary = chromium_binary()
    require(binary is not None, "chromium not installed (apt-get install chromium)")
    assert binary is not None
    out = REPO / "test-output" / "console" / "releases"
    bundle, public, _ = office
    archive = tmp_path / f"release-{V1}.tar"
    ra.write_archive(bundle, archive)
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    (tampered / "models" / "face.tflite").write_bytes(b"x" * 3000)
    ra.write_archive(tampered, tmp_path / "tampered.tar")
    settings = aggregator_config.load(None, database_url=f"sqlite:///{tmp_path / 'a.db'}",
                                      data_dir=tmp_path / "data", rate_limit_per_min=100000)
    with live_aggregator(settings) as (url, app), Chromium(binary, 1280, 900) as browser:
        with app.state.ctx.sessions() as session:
            accounts.add_user(session, "office", "admin", PW)
            for room in ("LAB-301", "LAB-302"):
                session.add(Room(id=room, name=room, site="north", timezone="UTC",
                                 created_at=utcnow()))
            session.commit()
            add_device(session, "LAB-301", "pi-lab-301")
            svc.trust_key(session, public, "office")
        browser.navigate(f"{url}/login")
        submit(browser, "form[action='/login']", {"name": "office", "password": PW})
        browser.navigate(f"{url}/devices")
        assert browser.evaluate("!!document.querySelector('#add-release')")
        assert not browser.evaluate("!!document.querySelector('#start-rollout')")

        set_files(browser, "#add-release input[type=file]", [tmp_path / "tampered.tar"])
        submit(browser, "#add-release", {})
        error = browser.evaluate("document.querySelector('#err-bundle').innerText")
        assert "models/face.tflite: changed since signing" in error, error
        shoot(browser, out, "devices-add-refused")

        set_files(browser, "#add-release input[type=file]", [archive])
        submit(browser, "#add-release", {})
        text = browser.evaluate("document.body.innerText")
        assert f"release {V1} added from release-{V1}.tar: 6 files" in text, text[:2000]

        submit(browser, "#start-rollout", {"version": V1, "canary_room": "LAB-302",
                                           "share_pct": "20", "max_kb_per_s": "400"})
        error = browser.evaluate("document.querySelector('#err-canary_room').innerText")
        assert "no device in canary room 'LAB-302'" in error, error
        assert browser.evaluate("document.querySelector('[name=max_kb_per_s]').value") == "400"
        shoot(browser, out, "devices-release-forms")

        submit(browser, "#start-rollout", {"version": V1, "canary_room": "LAB-301",
                                           "share_pct": "20", "max_kb_per_s": "400"})
        text = browser.evaluate("document.body.innerText")
        assert f"Rollout of {V1}: canary" in text and "then 20% of the fleet" in text
        shoot(browser, out, "devices-rollout-started")
    assert not list(svc.incoming_dir(settings).iterdir())
