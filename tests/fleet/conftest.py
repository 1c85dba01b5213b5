"""Fleet fixtures: a real aggregator (SQLite, in-process) and small fabricated disk images."""

from __future__ import annotations

import lzma
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.app import create_app
from cloud_sync.aggregator.services.devices import create_admin_token
from fleet import disk
from tests.conftest import require
from tests.fleet.releases import Releases, build_releases

TOOLS = ("mkfs.vfat", "fsck.vfat", "mcopy", "mkfs.ext4", "e2fsck", "debugfs", "sfdisk", "xz")


@pytest.fixture(scope="session", autouse=True)
def _tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None and not Path("/sbin", t).exists()]
    require(not missing, f"missing disk tools: {missing} (scripts/ensure-system-deps.sh test)")


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    """Three signed releases of this tree and an installed dependency layer (built once)."""
    return build_releases(tmp_path_factory.mktemp("releases"))


@dataclass
class Aggregator:
    client: TestClient
    admin_token: str
    url: str = "http://testserver"

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[Aggregator]:
    settings = aggregator_config.load(None, database_url=f"sqlite:///{tmp_path / 'agg.db'}",
                                      data_dir=tmp_path / "agg-data")
    with TestClient(create_app(settings)) as client:
        sessions = client.app.state.ctx.sessions  # type: ignore[attr-defined]
        with sessions() as session:
            _, token = create_admin_token(session, "fleet-tests")
        agg = Aggregator(client, token)
        for room in ("LAB-301", "LAB-302"):
            assert client.post("/api/v1/rooms", json={"id": room, "site": "north"},
                               headers=agg.admin()).status_code == 201
        yield agg


def fabricated_root(root: Path) -> Path:
    """A small root file system: enough structure for the image and first-boot tests."""
    for rel in ("etc/systemd/system", "var/lib/classroom-attendance", "boot/firmware", "usr/bin",
                "root"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("debian\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n")
    (root / "etc/shadow").write_text("root:*:20000:0:99999:7:::\n")
    (root / "etc/shadow").chmod(0o600)
    (root / "usr/bin/python3").write_bytes(b"\x7fELF fake" + bytes(4096))
    (root / "usr/bin/python").symlink_to("python3")
    return root


@pytest.fixture
def small_image(tmp_path: Path) -> tuple[Path, disk.Layout]:
    """An image assembled by fleet.disk from a fabricated root and boot directory, xz'd."""
    root = fabricated_root(tmp_path / "root")
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "config.txt").write_text("arm_64bit=1\n")
    (boot / "cmdline.txt").write_text("root=LABEL=rootfs rootwait\n")
    raw = tmp_path / "small.img"
    layout = disk.assemble(raw, boot, root, boot_bytes=64 * disk.MIB, root_bytes=32 * disk.MIB,
                           workdir=tmp_path)
    xz = tmp_path / "small.img.xz"
    with raw.open("rb") as src, lzma.open(xz, "wb", preset=0) as dst:
        shutil.copyfileobj(src, dst, 4 * disk.MIB)
    raw.unlink()
    return xz, layout
