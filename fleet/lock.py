"""The device's dependency set, pinned with hashes, per target interpreter.

A device never resolves anything: what it installs is decided here, on the builder, once per
target operating system, and written to ``fleet/locks/<target>.txt`` (``python -m fleet lock``).
Each lock is resolved by uv for that target's interpreter *exactly* (CPython 3.11.2 on Debian
bookworm, not "3.11": redis needs async-timeout below 3.11.3, and a marker evaluated for the
builder's own interpreter dropped it, so the image failed to install) and its glibc, with the
sha256 of every file of every pinned version. The bundle downloads exactly these files (pip
checks each hash), and the device installs them with ``--require-hashes`` (install-release.sh).

A new release of a dependency changes nothing until someone runs ``python -m fleet lock
--upgrade`` and commits the result; a change of pyproject's dependencies is caught by the test
suite (the lock records a digest of what it was resolved from).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK_DIR = REPO / "fleet" / "locks"
# sdist-only packages (no wheel on PyPI): built into a wheel on the builder, never on a device
SDIST_ONLY = ("face-recognition-models",)
DIGEST_PREFIX = "# dependencies-sha256: "
CONSTRAINTS = "constraints.txt"


class LockError(RuntimeError):
    """A lock cannot be made or read; the message says why."""


@dataclass(frozen=True)
class Target:
    """One operating system the appliance runs on, and its interpreter."""

    name: str
    description: str
    python: str  # the distribution's CPython, exactly (markers compare the full version)
    glibc: tuple[int, int]  # the distribution's glibc: manylinux wheels up to it install
    # pinned to what the OS ships, so that the venv (--system-site-packages) uses the OS's own
    # copy: Raspberry Pi OS's python3-picamera2 needs simplejpeg, built against the OS's numpy
    os_packages: tuple[str, ...] = ()

    @property
    def abi(self) -> str:
        major, minor = self.python.split(".")[:2]
        return f"cp{major}{minor}"

    @property
    def uv_platform(self) -> str:
        # uv knows manylinux tags up to 2_40 (no wheel on PyPI needs more)
        return f"aarch64-manylinux_{self.glibc[0]}_{min(self.glibc[1], 40)}"

    @property
    def pip_platforms(self) -> list[str]:
        """pip's names for every manylinux tag this target's glibc accepts (newest first)."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_aarch64" for m in range(minor, 16, -1)]
        return [*tags, "manylinux2014_aarch64"]

    @property
    def lock_path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"

    def lock_path_in(self, src: Path) -> Path:
        return src / "fleet" / "locks" / f"{self.name}.txt"


TARGETS: dict[str, Target] = {
    "bookworm": Target(
        "bookworm", "Debian 12 bookworm (make image; Raspberry Pi 4 with a USB camera)",
        python="3.11.2", glibc=(2, 36)),
    "trixie": Target(
        "trixie", "Raspberry Pi OS / Debian 13 trixie (make image BASE=...; Pi 5, Pi camera)",
        python="3.13.5", glibc=(2, 41), os_packages=("numpy==2.2.4",)),
}
DEFAULT_TARGET = "bookworm"


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise LockError(f"unknown target {name!r}: one of {', '.join(TARGETS)}") from None


def dependencies(src: Path = REPO) -> list[str]:
    with (src / "pyproject.toml").open("rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def digest(tgt: Target, src: Path = REPO) -> str:
    """What a lock is resolved from: pyproject's dependencies and the target."""
    constraints = (src / "fleet" / "locks" / CONSTRAINTS).read_text()
    text = "\n".join([*dependencies(src), tgt.python, str(tgt.glibc), *tgt.os_packages,
                      constraints])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_digest(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_PREFIX):
            return line.removeprefix(DIGEST_PREFIX).strip()
    return None


def uv() -> str:
    here = Path(sys.executable).with_name("uv")
    found = str(here) if here.exists() else shutil.which("uv")
    if not found:
        raise LockError("uv is not installed (pip install uv; make setup installs it)")
    return found


def compile_lock(tgt: Target, *, src: Path = REPO, out: Path | None = None,
                 upgrade: bool = False) -> Path:
    """Resolve pyproject's dependencies for ``tgt`` with uv and write the lock.

    An existing lock's pins are kept unless ``upgrade`` (uv reads it as preferences), so a
    change of one dependency moves nothing else."""
    out = out or tgt.lock_path_in(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [uv(), "pip", "compile", str(src / "pyproject.toml"), "--quiet", "--generate-hashes",
           "--python-version", tgt.python, "--python-platform", tgt.uv_platform,
           "--only-binary", ":all:", "--custom-compile-command",
           f"python -m fleet lock --target {tgt.name}", "-o", str(out)]
    for name in SDIST_ONLY:
        cmd += ["--no-binary", name]
    if upgrade:
        cmd.append("--upgrade")
    shared = src / "fleet" / "locks" / CONSTRAINTS
    constraints = out.with_name(f".{tgt.name}-constraints.txt")
    constraints.write_text(shared.read_text() + "".join(f"{p}\n" for p in tgt.os_packages))
    cmd += ["--constraint", str(constraints)]
    # uv reads no pip configuration: the builder's find-links and mirrors do not enter the lock
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    result = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            env={**env, "UV_NO_CONFIG": "1", "UV_NO_PROGRESS": "1"})
    constraints.unlink()
    if result.returncode != 0:
        raise LockError(f"uv could not resolve the dependencies for {tgt.name}:\n"
                        + "\n".join(result.stderr.strip().splitlines()[-15:]))
    text = out.read_text()
    # the constraint file is a temporary path: name the pins instead
    text = re.sub(r"(?m)^(#\s+uv pip compile .*?) --constraint \S+", r"\1", text)
    text = re.sub(r"(?m)^    #   -c \S+\n", "", text)
    header = (f"# {tgt.description}: CPython {tgt.python}, glibc {tgt.glibc[0]}.{tgt.glibc[1]}"
              f", aarch64.\n{DIGEST_PREFIX}{digest(tgt, src)}\n")
    if tgt.os_packages:
        header += f"# pinned to the OS's own packages: {', '.join(tgt.os_packages)}\n"
    out.write_text(header + text)
    check_installable(tgt, out)
    return out


def pip_target_args(tgt: Target) -> list[str]:
    """pip's options for installing for ``tgt`` from this machine (tags, ABI, Requires-Python)."""
    args = ["--python-version", tgt.python, "--implementation", "cp", "--abi", tgt.abi,
            "--abi", "abi3", "--abi", "none"]
    for tag in tgt.pip_platforms:
        args += ["--platform", tag]
    return args


def check_installable(tgt: Target, lock: Path) -> None:
    """pip, as the device's installer, accepts every pinned wheel for the target: its tags and
    its Requires-Python, upper bound included (uv ignores upper bounds). Metadata only."""
    pins = [p for p in read_lock(lock) if not p.sdist_only]
    with tempfile.TemporaryDirectory(prefix="lock-check-") as tmp:
        wanted = Path(tmp) / "pins.txt"
        wanted.write_text("".join(p.requirement() + "\n" for p in pins))
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
             "--ignore-installed", "--only-binary=:all:", "--require-hashes",
             "--disable-pip-version-check", "--target", str(Path(tmp) / "t"),
             *pip_target_args(tgt), "-r", str(wanted)],
            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
        raise LockError(f"pip refuses a pin of the {tgt.name} lock for CPython {tgt.python} "
                        f"(exclude the version in fleet/locks/{CONSTRAINTS}):\n"
                        + "\n".join(errors[-6:]))


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]

    @property
    def sdist_only(self) -> bool:
        return self.name in SDIST_ONLY

    def requirement(self) -> str:
        return f"{self.name}=={self.version} " + " ".join(f"--hash={h}" for h in self.hashes)


def read_lock(lock: Path) -> list[Pin]:
    """The pins of a lock file (joined continuation lines, comments dropped)."""
    if not lock.exists():
        raise LockError(f"no lock {lock}: run `python -m fleet lock`")
    text = re.sub(r"\\\n", " ", lock.read_text())
    pins = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)\s*(.*)$", line)
        if match is None:
            raise LockError(f"{lock}: cannot read {line[:80]!r}")
        hashes = tuple(re.findall(r"--hash=(sha256:[0-9a-f]{64})", match.group(3)))
        if not hashes:
            raise LockError(f"{lock}: {match.group(1)} has no hash")
        pins.append(Pin(match.group(1).lower(), match.group(2), hashes))
    return pins


def check_current(tgt: Target, src: Path = REPO) -> None:
    """Refuse a lock that was resolved from other dependencies than pyproject's."""
    lock = tgt.lock_path_in(src)
    if not lock.exists():
        raise LockError(f"no lock for {tgt.name}: run `python -m fleet lock --target {tgt.name}`")
    if recorded_digest(lock) != digest(tgt, src):
        raise LockError(f"{lock.relative_to(src)} is out of date with pyproject.toml's "
                        f"dependencies: run `python -m fleet lock --target {tgt.name}` and "
                        "commit it")
