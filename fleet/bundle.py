"""Release bundles: everything one release needs on a device, with no network there.

A bundle is a directory::

    VERSION                 e.g. 0.1.0+g1a2b3c4 (pyproject version + git commit)
    wheels/                 the project's wheel and every dependency, for the target platform
    models/                 the model files of models/manifest.toml, verified by sha256
    systemd/                the device's units (the release installs them)
    install-release.sh      installs the bundle into PREFIX/releases/<VERSION>
    manifest.json           every other file with its sha256 and size (cloud_sync.release_manifest)
    manifest.sig            when signed (``aggregator releases sign``, ``make image SIGNING_KEY=``)

The same bundle goes into the SD card image (``make image``), onto a Raspberry Pi OS card's
FAT partition (``make image BASE=...``) and over SSH to a fleet (``make deploy``).
The third-party wheels are downloaded once per dependency set and platform and cached; only
the project's own wheel is rebuilt after a code change.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from cloud_sync.release_manifest import write_manifest
from models.fetcher import fetch_all

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
INSTALLER = REPO / "image_build" / "install-release.sh"
PROJECT = "classroom-attendance"
# pip's names for the Raspberry Pi's platform: 64-bit Raspberry Pi OS / Debian bookworm
# (glibc 2.36, CPython 3.11) takes manylinux wheels up to 2_36.
ARM64_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64",
                   "manylinux_2_17_aarch64", "linux_aarch64")
SOURCE_PATHS = ("appliance", "cloud_sync", "models", "fleet", "pyproject.toml", "README.md",
                "LICENSE")


class BundleError(RuntimeError):
    """A bundle cannot be built; the message says which step and why."""


def _run(cmd: list[str], **kwargs: object) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise BundleError(f"{' '.join(cmd[:4])} ... failed:\n{tail}")
    return str(result.stdout)


def base_version(src: Path = REPO) -> str:
    with (src / "pyproject.toml").open("rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def release_version(src: Path = REPO) -> str:
    """pyproject's version plus the git commit (and ``.dirty`` for uncommitted changes)."""
    version = base_version(src)
    try:
        commit = _run(["git", "-C", str(src), "rev-parse", "--short=8", "HEAD"]).strip()
        dirty = _run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"])
    except (BundleError, FileNotFoundError):
        return version
    return f"{version}+g{commit}" + (".dirty" if dirty.strip() else "")


def dependencies(src: Path = REPO) -> list[str]:
    with (src / "pyproject.toml").open("rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def build_project_wheel(dest: Path, version: str, src: Path = REPO,
                        patch: dict[str, tuple[str, str]] | None = None) -> Path:
    """The project's wheel with ``version`` (a copy of the source with that version set).

    ``patch`` maps a relative path to (old, new) text replacements (tests build a faulty
    release this way)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bundle-src-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        for name in SOURCE_PATHS:
            path = src / name
            if path.is_dir():
                shutil.copytree(path, copy / name, ignore=shutil.ignore_patterns(
                    "__pycache__", "files", "*.pyc"))
            elif path.exists():
                shutil.copy2(path, copy / name)
        pyproject = copy / "pyproject.toml"
        text, count = re.subn(r'(?m)^version = ".*"$', f'version = "{version}"',
                              pyproject.read_text())
        if count != 1:
            raise BundleError("pyproject.toml has no single `version = ...` line")
        pyproject.write_text(text)
        for rel, (old, new) in (patch or {}).items():
            target = copy / rel
            content = target.read_text()
            if old not in content:
                raise BundleError(f"patch: {old!r} not in {rel}")
            target.write_text(content.replace(old, new))
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
              "--disable-pip-version-check", "-w", str(dest), str(copy)])
    norm = version.replace("-", "_")
    wheels = sorted(dest.glob(f"classroom_attendance-{norm}-*.whl"))
    if not wheels:
        raise BundleError(f"no wheel classroom_attendance-{norm}-*.whl in {dest}")
    return wheels[-1]


def _platform_args(platform: str) -> list[str]:
    if platform == "native":
        return []
    if platform != "arm64":
        raise BundleError(f"unknown platform {platform!r} (arm64 or native)")
    args = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
            "--abi", "cp311"]
    for tag in ARM64_PLATFORMS:
        args += ["--platform", tag]
    return args


def dependency_wheels(cache: Path, platform: str, src: Path = REPO) -> Path:
    """Wheels of every dependency for ``platform``, downloaded once per dependency set."""
    deps = dependencies(src)
    key = hashlib.sha256(("\n".join(deps) + platform).encode()).hexdigest()[:16]
    out = cache / f"wheels-{platform}-{key}"
    if (out / ".complete").exists():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # Pure data/source-only packages (no wheel on PyPI, e.g. face-recognition-models) are built
    # into wheels here, on the builder, so the device never builds anything.
    binary = [d for d in deps if not _sdist_only(d)]
    sdists = [d for d in deps if _sdist_only(d)]
    _LOGGER.info("downloading %d dependencies for %s", len(binary), platform)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
          *_platform_args(platform), "-d", str(partial), *binary])
    if sdists:
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
              "--disable-pip-version-check", "-w", str(partial), *sdists])
    (partial / ".complete").touch()
    partial.rename(out)
    return out


SDIST_ONLY = ("face-recognition-models",)


def _sdist_only(requirement: str) -> bool:
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()
    return name in SDIST_ONLY


def build_bundle(dest: Path, *, platform: str = "arm64", cache: Path | None = None,
                 version: str | None = None, src: Path = REPO,
                 patch: dict[str, tuple[str, str]] | None = None) -> Path:
    """Assemble a bundle directory at ``dest`` (replaced if present)."""
    cache = cache or src / "build" / "cache"
    version = version or release_version(src)
    shutil.rmtree(dest, ignore_errors=True)
    wheels = dest / "wheels"
    wheels.mkdir(parents=True)
    for wheel in dependency_wheels(cache, platform, src).glob("*.whl"):
        link = wheels / wheel.name
        try:
            link.hardlink_to(wheel)
        except OSError:
            shutil.copy2(wheel, link)
    project = build_project_wheel(wheels, version, src, patch)
    models = dest / "models"
    # The manifest decides which models (generic: a new embedder in the manifest is picked up).
    fetch_all(models, cache_dir=cache / "model-archives")
    shutil.copy2(INSTALLER, dest / "install-release.sh")
    shutil.copytree(src / "systemd", dest / "systemd")
    (dest / "VERSION").write_text(version + "\n")
    # last: the manifest hashes every file above (anything added to a bundle goes before it)
    write_manifest(dest, version=version, platform=platform,
                   project_wheel=f"wheels/{project.name}")
    _LOGGER.info("bundle %s ready in %s", version, dest)
    return dest


def bundle_version(bundle: Path) -> str:
    return (bundle / "VERSION").read_text().strip()


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
