"""The device's dependency lock (fleet/locks/<target>.txt), per target interpreter.

Offline after the first run: the locked wheels are downloaded once into the wheel cache (each
file checked against the lock's sha256 by pip); everything below then runs without a network,
the way a classroom Pi installs (``--no-index``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.bundle import build_project_wheel, locked_wheels, wheel_cache, write_requirements
from fleet.lock import (
    TARGETS,
    LockError,
    check_current,
    pip_target_args,
    read_lock,
    recorded_digest,
    target,
    uv,
)

NO_PIP_CONFIG = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
                 "PIP_CONFIG_FILE": os.devnull}


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_project_wheel(tmp_path_factory.mktemp("project"), "0.1.0+glocktest")


def _bundle_wheels(tmp_path: Path, name: str, project_wheel: Path) -> Path:
    """A bundle's wheels/ and requirements.txt for ``name``, as build_bundle makes them."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for wheel in locked_wheels(wheel_cache(), target(name)).glob("*.whl"):
        (wheels / wheel.name).hardlink_to(wheel)
    shutil.copy2(project_wheel, wheels / project_wheel.name)
    return write_requirements(wheels)


@pytest.mark.parametrize("name", list(TARGETS))
def test_lock_is_current_and_fully_hashed(name: str) -> None:
    """The committed lock was resolved from pyproject's dependencies as they are now, for this
    target's exact interpreter, and every pin carries hashes."""
    tgt = target(name)
    check_current(tgt)
    text = tgt.lock_path.read_text()
    assert f"CPython {tgt.python}" in text
    pins = read_lock(tgt.lock_path)
    assert {"numpy", "opencv-python-headless", "dlib-bin", "redis"} <= {p.name for p in pins}
    assert all(p.hashes for p in pins)
    for spec in tgt.os_packages:  # the venv uses the OS's copy: same version
        pkg, version = spec.split("==")
        assert any(p.name == pkg and p.version == version for p in pins), spec


def test_a_dependency_change_makes_the_lock_stale(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "fleet" / "locks").mkdir(parents=True)
    shutil.copy2(Path("pyproject.toml"), src / "pyproject.toml")
    for f in Path("fleet/locks").iterdir():
        shutil.copy2(f, src / "fleet" / "locks" / f.name)
    check_current(target("bookworm"), src)
    text = (src / "pyproject.toml").read_text().replace('"redis>=5"', '"redis>=6"')
    (src / "pyproject.toml").write_text(text)
    with pytest.raises(LockError, match="out of date"):
        check_current(target("bookworm"), src)
    assert recorded_digest(src / "fleet/locks/bookworm.txt")


@pytest.mark.parametrize("name", list(TARGETS))
def test_bundle_resolves_and_installs_offline_for_the_exact_interpreter(
        name: str, tmp_path: Path, project_wheel: Path) -> None:
    """The bundle (locked wheels + the project's wheel) resolves for the target's interpreter,
    markers evaluated for its exact version (uv), and pip - the device's installer - accepts
    every file offline with --require-hashes for its tags and Requires-Python (``--no-deps``:
    pip evaluates markers for the interpreter it runs on, this machine's, which is how a bundle
    built for "3.11" lacked async-timeout that redis needs below 3.11.3 on the image's 3.11.2).
    """
    tgt = target(name)
    requirements = _bundle_wheels(tmp_path, name, project_wheel)
    wheels = requirements.parent / "wheels"
    resolved = subprocess.run(
        [uv(), "pip", "install", "--dry-run", "--offline", "--no-index", "--find-links",
         str(wheels), "--require-hashes", "-r", str(requirements), "--python-version",
         tgt.python, "--python-platform", tgt.uv_platform, "--target", str(tmp_path / "uv"),
         "--no-config"], capture_output=True, text=True, check=False)
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    assert "classroom-attendance==0.1.0+glocktest" in resolved.stderr
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--quiet",
         "--no-deps", "--no-index", "--find-links", str(wheels), "--require-hashes", "-r",
         str(requirements),
         "--ignore-installed", "--target", str(tmp_path / "pip"), "--only-binary=:all:",
         *pip_target_args(tgt)], capture_output=True, text=True, check=False,
        env=NO_PIP_CONFIG)
    assert installed.returncode == 0, installed.stderr[-2000:]


def test_exact_interpreter_markers_are_what_fails_without_the_lock(
        tmp_path: Path, project_wheel: Path) -> None:
    """The check above is the one that catches the old failure: the same wheels without
    async-timeout resolve for CPython 3.11.7 (the builder) and not for 3.11.2 (the image)."""
    requirements = _bundle_wheels(tmp_path, "bookworm", project_wheel)
    wheels = requirements.parent / "wheels"
    for wheel in wheels.glob("async_timeout-*.whl"):
        wheel.unlink()
    requirements.write_text("".join(line for line in requirements.read_text().splitlines(True)
                                    if not line.startswith("async-timeout")))
    tgt = target("bookworm")

    def resolve(python: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [uv(), "pip", "install", "--dry-run", "--offline", "--no-index", "--find-links",
             str(wheels), "--require-hashes", "-r", str(requirements), "--python-version",
             python, "--python-platform", tgt.uv_platform, "--target", str(tmp_path / python),
             "--no-config"], capture_output=True, text=True, check=False)

    assert resolve("3.11.7").returncode == 0
    failed = resolve(tgt.python)
    assert failed.returncode != 0 and "async-timeout" in failed.stderr


def test_bundle_requirements_pin_every_wheel_by_hash(tmp_path: Path, project_wheel: Path) -> None:
    requirements = _bundle_wheels(tmp_path, "bookworm", project_wheel)
    lines = requirements.read_text().splitlines()
    wheels = list((requirements.parent / "wheels").glob("*.whl"))
    assert len(lines) == len(wheels)
    assert all("==" in ln and "--hash=sha256:" in ln for ln in lines)
