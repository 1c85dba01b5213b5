"""Debian packages of another architecture, fetched with apt into a private directory.

The image's kernel (for the initramfs check), and packages a test puts into a guest, come from
Debian's archive through apt itself, with its signature checks, in an apt state directory of
their own: this machine's apt configuration and dpkg database are never touched.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"


class AptError(RuntimeError):
    """apt could not fetch a package; the message is apt's."""


def _apt_options(state: Path, arch: str) -> list[str]:
    return ["-o", f"Dir={state}", "-o", f"Dir::State::status={state}/var/lib/dpkg/status",
            "-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures::={arch}",
            "-o", "Dir::Etc::trusted=/etc/apt/trusted.gpg",
            "-o", "Dir::Etc::trustedparts=/etc/apt/trusted.gpg.d",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-qq"]


def apt_state(cache: Path, suite: str, arch: str,
              components: str = "main") -> tuple[Path, list[str]]:
    """An apt state directory for ``suite``/``arch`` (package lists updated once a day)."""
    key = hashlib.sha256(f"{suite} {arch} {components}".encode()).hexdigest()[:12]
    state = cache / f"apt-{suite}-{arch}-{key}"
    for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "var/lib/apt/lists/partial",
                "var/cache/apt/archives/partial", "var/lib/dpkg"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "var/lib/dpkg/status").touch()
    (state / "etc/apt/sources.list").write_text(f"deb {MIRROR} {suite} {components}\n")
    options = _apt_options(state, arch)
    lists = list((state / "var/lib/apt/lists").glob("*_Packages*"))
    if not lists or time.time() - min(p.stat().st_mtime for p in lists) > 86400:
        _apt(["apt-get", *options, "update"])
    return state, options


def _apt(cmd: list[str], cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise AptError(f"{cmd[0]} is not installed")
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
    if result.returncode != 0:
        raise AptError(f"{' '.join(cmd[:1] + cmd[-2:])} failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def download(cache: Path, suite: str, arch: str, packages: list[str], dest: Path,
             components: str = "main") -> list[Path]:
    """Download ``packages`` (exact names) as .deb files into ``dest``."""
    _, options = apt_state(cache, suite, arch, components)
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.deb"))
    _apt(["apt-get", *options, "download", *packages], cwd=dest)
    return sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob("*.deb"))


def depends(cache: Path, suite: str, arch: str, package: str) -> list[str]:
    _, options = apt_state(cache, suite, arch)
    out = _apt(["apt-cache", *options, "depends", "--no-recommends", "--no-suggests", package])
    return re.findall(r"^\s+Depends: ([^\s<>]+)$", out, flags=re.M)


def kernel_tree(cache: Path, suite: str = "bookworm", arch: str = "arm64") -> Path:
    """The files of Debian's current ``linux-image-<arch>`` kernel package, with the module
    index (modules.alias, modules.dep) depmod makes on installation. Cached per kernel version.
    """
    image = next((d for d in depends(cache, suite, arch, f"linux-image-{arch}")
                  if d.startswith("linux-image-")), None)
    if image is None:
        raise AptError(f"linux-image-{arch} in {suite} depends on no kernel package")
    tree = cache / f"kernel-{image}"
    if (tree / ".complete").exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    debs = download(cache, suite, arch, [image], cache / "debs")
    deb = next(d for d in debs if d.name.startswith(image + "_"))
    _apt(["dpkg-deb", "-x", str(deb), str(tree)])
    version = image.removeprefix("linux-image-")
    depmod = shutil.which("depmod") or "/sbin/depmod"
    _apt([depmod, "-b", str(tree), version])
    deb.unlink()
    (tree / ".complete").touch()
    return tree
