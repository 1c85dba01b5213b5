"""Release bundles: everything one release needs on a device, with no network there.

A bundle is a directory::

    VERSION                 e.g. 0.1.0+g1a2b3c4 (pyproject version + git commit)
    wheels/                 the project's wheel and every dependency, for the target (fleet.lock)
    requirements.txt        every wheel of wheels/ by version and sha256 (installed with
                            --require-hashes)
    models/                 the model files of models/manifest.toml, verified by sha256
    systemd/                the device's units (the release installs them)
    install-release.sh      installs the bundle into PREFIX/releases/<VERSION>
    manifest.json           every other file with its sha256 and size (cloud_sync.release_manifest)
    manifest.sig            when signed (``aggregator releases sign``, ``make image SIGNING_KEY=``)

The same bundle goes into the SD card image (``make image``), onto a Raspberry Pi OS card's
FAT partition (``make image BASE=...``) and over SSH to a fleet (``make deploy``).
The third-party wheels are exactly those of the target's lock (``fleet/locks/<target>.txt``),
downloaded once per lock with their hashes checked and cached; only the project's own wheel is
rebuilt after a code change.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from cloud_sync.release_manifest import write_manifest
from fleet.lock import (
    DEFAULT_TARGET,
    SDIST_ONLY,
    Pin,
    Target,
    check_current,
    dependencies,
    pip_target_args,
    read_lock,
    target,
)
from models.fetcher import fetch_all

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
INSTALLER = REPO / "image_build" / "install-release.sh"
PROJECT = "classroom-attendance"
# ``arm64``: the Debian image's target (fleet.lock.TARGETS; the name older commands used)
PLATFORM_ALIASES = {"arm64": DEFAULT_TARGET}
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


@contextlib.contextmanager
def _building(out: Path) -> Iterator[None]:
    """Hold ``out``'s build lock (an flock on ``<out>.lock`` beside it): two processes that
    need the same cache entry at once (two test workers, two builds) would otherwise download
    into the same ``.partial`` folder, each deleting the other's files; the second waits and
    then finds the entry complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _native_wheels(cache: Path, src: Path) -> Path:
    """This machine's wheels (test hosts of ``make deploy``'s tests), resolved here, unpinned."""
    deps = dependencies(src)
    key = hashlib.sha256(("\n".join(deps) + sys.version).encode()).hexdigest()[:16]
    out = cache / f"wheels-native-{key}"
    with _building(out):  # one builder per entry (parallel tests, two makes)
        if (out / ".complete").exists():
            return out
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        binary = [d for d in deps if _name(d) not in SDIST_ONLY]
        sdists = [d for d in deps if _name(d) in SDIST_ONLY]
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "-d", str(partial), *binary])
        if sdists:
            _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                  "--disable-pip-version-check", "-w", str(partial), *sdists])
        (partial / ".complete").touch()
        partial.rename(out)
        return out


def locked_wheels(cache: Path, tgt: Target, src: Path = REPO) -> Path:
    """The wheels of ``tgt``'s lock, downloaded once per lock and checked against its hashes.

    pip downloads exactly the pinned files for the target's interpreter and glibc (``--no-deps``:
    the lock is the whole set) and refuses any whose sha256 is not in the lock; an sdist-only
    package is downloaded the same way and built into a wheel here, on the builder."""
    check_current(tgt, src)
    lock = tgt.lock_path_in(src)
    key = hashlib.sha256(lock.read_bytes()).hexdigest()[:16]
    out = cache / f"wheels-{tgt.name}-{key}"
    with _building(out):  # one builder per entry (parallel tests, two makes)
        if (out / ".complete").exists():
            return out
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        pins = read_lock(lock)
        binary = partial / "binary.txt"
        binary.write_text("".join(p.requirement() + "\n" for p in pins if not p.sdist_only))
        _LOGGER.info("downloading %d locked wheels for %s", len(pins), tgt.name)
        platform = ["--only-binary=:all:", *pip_target_args(tgt)]
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "--no-deps", "--require-hashes", *platform, "-d", str(partial), "-r", str(binary)])
        for pin in (p for p in pins if p.sdist_only):
            for wheel in sdist_wheel(cache, pin).glob("*.whl"):
                shutil.copy2(wheel, partial / wheel.name)
        binary.unlink()
        found = {_wheel_name(w) for w in partial.glob("*.whl")}
        missing = [p.name for p in pins if p.name not in found]
        if missing:
            raise BundleError(f"no wheel for {tgt.name} of: {', '.join(missing)}")
        (partial / ".complete").touch()
        partial.rename(out)
        return out


def sdist_wheel(cache: Path, pin: Pin) -> Path:
    """An sdist-only pin built into a wheel on the builder, once (shared by every target: such
    packages are pure data or pure Python). The sdist is checked against the lock's hashes."""
    key = hashlib.sha256(pin.requirement().encode()).hexdigest()[:16]
    out = cache / f"sdist-{pin.name}-{pin.version}-{key}"
    with _building(out):  # one builder per entry (parallel tests, two makes)
        if (out / ".complete").exists():
            return out
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        sources = partial / "sdist"
        sources.mkdir(parents=True)
        wanted = partial / "pin.txt"
        wanted.write_text(pin.requirement() + "\n")
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
              "--no-deps", "--require-hashes", "--no-binary=:all:", "-d", str(sources),
              "-r", str(wanted)])
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
              "--disable-pip-version-check", "-w", str(partial), *map(str, sources.iterdir())])
        shutil.rmtree(sources)
        wanted.unlink()
        (partial / ".complete").touch()
        partial.rename(out)
        return out


def wheel_cache() -> Path:
    """Where downloaded wheels are kept between builds and clones: every file in it is checked
    against a lock's sha256 when it is fetched, and a wheelhouse is keyed on its lock's text."""
    env = os.environ.get("FLEET_WHEEL_CACHE")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(env) if env else base / "classroom-attendance" / "wheels"


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()
    return canonicalize_name(name)


def _wheel_name(wheel: Path) -> str:
    return str(canonicalize_name(parse_wheel_filename(wheel.name)[0]))


def write_requirements(wheels: Path) -> Path:
    """``requirements.txt`` of a bundle: every wheel in it pinned by version and sha256, what
    install-release.sh installs with ``--require-hashes`` (a changed or swapped file fails)."""
    lines = []
    for wheel in sorted(wheels.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lines.append(f"{name}=={version} --hash=sha256:{sha}\n")
    out = wheels.parent / "requirements.txt"
    out.write_text("".join(lines))
    return out


def dependency_wheels(cache: Path, platform: str, src: Path = REPO) -> Path:
    """Wheels of every dependency: a target's lock, or this machine's (``native``)."""
    if platform == "native":
        return _native_wheels(cache, src)
    return locked_wheels(cache, target(PLATFORM_ALIASES.get(platform, platform)), src)


def build_bundle(dest: Path, *, platform: str = "arm64", cache: Path | None = None,
                 version: str | None = None, src: Path = REPO,
                 patch: dict[str, tuple[str, str]] | None = None) -> Path:
    """Assemble a bundle directory at ``dest`` (replaced if present)."""
    own_cache = cache is None
    cache = cache or src / "build" / "cache"
    version = version or release_version(src)
    shutil.rmtree(dest, ignore_errors=True)
    wheels = dest / "wheels"
    wheels.mkdir(parents=True)
    wheel_dir = dependency_wheels(wheel_cache() if own_cache else cache, platform, src)
    for wheel in wheel_dir.glob("*.whl"):
        link = wheels / wheel.name
        try:
            link.hardlink_to(wheel)
        except OSError:
            shutil.copy2(wheel, link)
    project = build_project_wheel(wheels, version, src, patch)
    write_requirements(wheels)
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
