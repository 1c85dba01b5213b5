"""The model fetcher: checksum mismatch, missing model, offline cache hit, idempotency."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from models import fetcher
from models.fetcher import ModelError, ModelSpec

PAYLOAD = b"not really a tflite model, but bytes with a checksum" * 100


def _spec(payload: bytes = PAYLOAD, **changes: object) -> ModelSpec:
    base = {
        "name": "tiny",
        "file": "tiny.tflite",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "package": "tiny-model-pkg==1.0.0",
        "member": "tiny_model_pkg/data/tiny.tflite",
        "license": "CC0-1.0",
    }
    base.update(changes)
    return ModelSpec.model_validate(base)


def _wheel(cache: Path, payload: bytes = PAYLOAD) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "tiny_model_pkg-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tiny_model_pkg/data/tiny.tflite", payload)
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record any attempt to run pip; the offline tests assert there was none."""
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(fetcher.subprocess, "run", fake_run)
    return calls


def test_offline_cache_hit_extracts_and_verifies(tmp_path: Path, no_network: list) -> None:
    _wheel(tmp_path / "cache")
    path = fetcher.fetch(_spec(), tmp_path / "models", tmp_path / "cache")
    assert path.read_bytes() == PAYLOAD
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the service user
    assert no_network == []


def test_fetch_is_idempotent(tmp_path: Path, no_network: list) -> None:
    _wheel(tmp_path / "cache")
    first = fetcher.fetch(_spec(), tmp_path / "models", tmp_path / "cache")
    mtime = first.stat().st_mtime_ns
    (tmp_path / "cache" / "tiny_model_pkg-1.0.0-py3-none-any.whl").unlink()  # not needed again
    second = fetcher.fetch(_spec(), tmp_path / "models", tmp_path / "cache")
    assert second == first and second.stat().st_mtime_ns == mtime
    assert no_network == []


def test_checksum_mismatch_in_archive_is_refused(tmp_path: Path, no_network: list) -> None:
    _wheel(tmp_path / "cache", payload=PAYLOAD[:-1] + b"X")
    with pytest.raises(ModelError, match=r"tiny.*does not match the manifest"):
        fetcher.fetch(_spec(), tmp_path / "models", tmp_path / "cache")
    assert not (tmp_path / "models" / "tiny.tflite").exists()
    assert list((tmp_path / "models").glob(".tiny*")) == []  # no temp file left behind


def test_corrupt_file_on_disk_is_replaced(tmp_path: Path, no_network: list) -> None:
    _wheel(tmp_path / "cache")
    target = tmp_path / "models" / "tiny.tflite"
    target.parent.mkdir()
    target.write_bytes(PAYLOAD[::-1])  # right size, wrong content
    fetcher.fetch(_spec(), tmp_path / "models", tmp_path / "cache")
    assert target.read_bytes() == PAYLOAD


def test_missing_model_names_model_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        fetcher.verify(_spec(), tmp_path / "tiny.tflite")
    assert "'tiny' is missing" in str(err.value)
    assert f"appliance models fetch --model-dir {tmp_path}" in str(err.value)


def test_corrupt_model_names_checksum_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "tiny.tflite"
    path.write_bytes(PAYLOAD[::-1])
    with pytest.raises(ModelError, match=r"'tiny' is corrupt: sha256.*--force"):
        fetcher.verify(_spec(), path)


def test_download_failure_offline_without_cache(tmp_path: Path, no_network: list) -> None:
    with pytest.raises(ModelError, match=r"could not download tiny-model-pkg==1.0.0"):
        fetcher.fetch(_spec(), tmp_path / "models", tmp_path / "cache")
    assert len(no_network) == 1 and "download" in no_network[0]


def test_model_path_unknown_name() -> None:
    with pytest.raises(ModelError, match="not in the manifest"):
        fetcher.model_path("no-such-model")


def test_manifest_entries_are_complete() -> None:
    specs = fetcher.load_manifest()
    names = {s.name for s in specs}
    assert {"blazeface_full_range", "blazeface_short_range", "dlib_shape_predictor_5",
            "dlib_face_recognition_resnet"} <= names
    for spec in specs:
        assert "==" in spec.package and spec.license


def test_real_models_verified(model_dir: Path) -> None:
    """`make setup` fetched every real model and each matches its manifest checksum."""
    for spec in fetcher.load_manifest():
        assert fetcher.model_path(spec.name, model_dir).stat().st_size == spec.size


def test_default_model_dir_in_a_checkout_and_in_a_release(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout" / "models"
    (checkout / "files").mkdir(parents=True)
    release = tmp_path / "releases" / "1.0"
    (release / "models").mkdir(parents=True)
    # a checkout (make setup): its models/files, whatever the venv holds
    assert fetcher.default_model_dir(checkout, release) == checkout / "files"
    # an installed release: the package in site-packages has no files/, the release has models/
    installed = tmp_path / "site-packages" / "models"
    installed.mkdir(parents=True)
    assert fetcher.default_model_dir(installed, release) == release / "models"
    # neither: the checkout's path (`appliance models fetch` fills it; ModelError names the fix)
    assert fetcher.default_model_dir(installed, tmp_path / "venv") == installed / "files"


def test_installed_release_finds_its_models_without_a_config(tmp_path: Path) -> None:
    """The layout install-release.sh makes: a thin venv with the `models` package in its
    site-packages, a .pth adding the dependencies' layer, the verified files in <release>/models.
    `appliance identify` there (no config file before first boot) must use those files."""
    import sys
    import sysconfig

    release = tmp_path / "releases" / "1.0"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(release)], check=True)
    python = release / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path"
                                "('purelib'))"], check=True, capture_output=True,
                               text=True).stdout.strip())
    package = site / "models"
    package.mkdir()
    for source in Path(fetcher.__file__).parent.iterdir():
        if source.suffix in (".py", ".toml"):
            (package / source.name).write_bytes(source.read_bytes())
    (site / "_classroom_deps.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
    (release / "models").mkdir()
    out = subprocess.run([str(python), "-c", "import models; print(models.__file__); "
                          "print(models.DEFAULT_MODEL_DIR)"], check=True, capture_output=True,
                         text=True, cwd=tmp_path).stdout.split()
    assert out == [str(package / "__init__.py"), str(release / "models")]
