"""Release bundles for the deploy and update tests, built once per session and signed.

Three releases of this tree (``platform=native``): 1 and 2 differ only in the project's wheel
(their version), 3 breaks the camera (every video file "does not exist"). A test prefix gets
release 1's dependency layer as a hard-linked copy of one installed once (a device flashed
with the image has its layer already; building one takes 30-90 s here), so that a test
installs thin releases in seconds; the layer build itself runs once per session, here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cloud_sync import release_manifest as rm
from fleet.bundle import REPO, build_bundle

V1, V2, BROKEN = "0.1.0+gtest1", "0.1.0+gtest2", "0.1.0+gtest3"
CAMERA_PATCH = {"appliance/capture/opencv.py": (
    "if not self.path.is_file():", "if True:  # the faulty release")}


@dataclass
class Releases:
    out: Path
    bundles: dict[str, Path]
    key_dir: Path  # release-signing.key / .pub (the office's key)
    template: Path  # a prefix with release 1's deps layer installed

    @property
    def public_key(self) -> Path:
        return self.key_dir / "release-signing.pub"

    @property
    def private_key(self) -> Path:
        return self.key_dir / "release-signing.key"

    def seed(self, prefix: Path) -> None:
        """Give ``prefix`` the installed dependency layer (hard links: instant, no space)."""
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(self.template / "deps"), str(prefix / "deps")],
                       check=True)

    def install(self, prefix: Path, version: str) -> None:
        """``version`` installed and current in ``prefix``, its bundle kept (a flashed card)."""
        self.seed(prefix)
        bundle = self.bundles[version]
        done = subprocess.run(["sh", str(bundle / "install-release.sh"), str(bundle),
                               str(prefix)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        (prefix / "bundles").mkdir(exist_ok=True)
        subprocess.run(["cp", "-al", str(bundle), str(prefix / "bundles" / version)], check=True)
        (prefix / "current").symlink_to(f"releases/{version}")


def build_releases(out: Path) -> Releases:
    cache = REPO / "build" / "cache"
    keys = out / "keys"
    keys.mkdir(parents=True)
    private, public = rm.generate_keypair()
    (keys / "release-signing.key").write_bytes(private)
    (keys / "release-signing.pub").write_bytes(public)
    key = rm.load_private_key(private)
    bundles = {}
    for version, patch in ((V1, None), (V2, None), (BROKEN, CAMERA_PATCH)):
        bundle = build_bundle(out / version, platform="native", cache=cache, version=version,
                              patch=patch)
        rm.sign_bundle(bundle, key)
        bundles[version] = bundle
    template = out / "template"
    template.mkdir()
    done = subprocess.run(["sh", str(bundles[V1] / "install-release.sh"), str(bundles[V1]),
                           str(template)], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHON": shutil.which("python3") or "python3"})
    assert done.returncode == 0, done.stderr
    return Releases(out, bundles, keys, template)
