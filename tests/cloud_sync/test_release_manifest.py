"""The signed manifest of a release bundle: what the builder writes and signs, and every way
the aggregator and the devices refuse a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud_sync import release_manifest as rm

WHEEL = "wheels/classroom_attendance-1.0-py3-none-any.whl"


def small_bundle(root: Path, version: str = "1.0") -> Path:
    for rel, data in {"VERSION": f"{version}\n".encode(), WHEEL: b"project" * 100,
                      "wheels/numpy-2.0-cp311-none-any.whl": b"n" * 5000,
                      "models/face.tflite": b"m" * 3000, "install-release.sh": b"#!/bin/sh\n",
                      "systemd/classroom-appliance.service": b"[Unit]\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    rm.write_manifest(root, version=version, platform="native", project_wheel=WHEEL)
    return root


@pytest.fixture
def keys(tmp_path: Path) -> tuple[object, dict[str, object]]:
    private, public = rm.generate_keypair()
    (tmp_path / "office.pub").write_bytes(public)
    return rm.load_private_key(private), rm.load_public_keys([tmp_path])


def test_sign_and_verify(tmp_path: Path, keys: tuple) -> None:
    private, trusted = keys
    bundle = small_bundle(tmp_path / "b")
    manifest = json.loads((bundle / rm.MANIFEST).read_text())
    assert [f["path"] for f in manifest["files"]] == sorted(f["path"] for f in manifest["files"])
    assert len(manifest["files"]) == 6 and manifest["project_wheel"] == WHEEL
    kid = rm.sign_bundle(bundle, private)
    parsed, signer = rm.verify_bundle(bundle, trusted)
    assert signer == kid and parsed.version == "1.0" and kid in trusted
    # a re-built manifest drops the old signature (it would not match any more)
    rm.write_manifest(bundle, version="1.0", platform="native", project_wheel=WHEEL)
    assert not (bundle / rm.SIGNATURE).exists()
    with pytest.raises(rm.ReleaseError, match="unsigned"):
        rm.verify_bundle(bundle, trusted)


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: (b / "models/face.tflite").write_bytes(b"x" * 3000), "sha256 differs"),
    (lambda b: (b / "models/face.tflite").write_bytes(b"x"), "1 bytes, the manifest says 3000"),
    (lambda b: (b / "models/face.tflite").unlink(), "models/face.tflite: missing"),
    (lambda b: (b / "models/extra.sh").write_text("rm -rf /"), "not in the manifest"),
    (lambda b: (b / "models/link").symlink_to("/etc/passwd"), "a symlink"),
])
def test_a_changed_file_is_refused(tmp_path: Path, keys: tuple, change, message: str) -> None:  # type: ignore[no-untyped-def]
    private, trusted = keys
    bundle = small_bundle(tmp_path / "b")
    rm.sign_bundle(bundle, private)
    change(bundle)
    with pytest.raises(rm.ReleaseError, match=message):
        rm.verify_bundle(bundle, trusted)


def test_a_changed_manifest_or_another_key_is_refused(tmp_path: Path, keys: tuple) -> None:
    private, trusted = keys
    bundle = small_bundle(tmp_path / "b")
    rm.sign_bundle(bundle, private)
    data = (bundle / rm.MANIFEST).read_bytes()
    (bundle / rm.MANIFEST).write_bytes(data.replace(b'"native"', b'"arm64"'))
    with pytest.raises(rm.ReleaseError, match="bad signature"):
        rm.verify_bundle(bundle, trusted)
    (bundle / rm.MANIFEST).write_bytes(data)
    other, _ = rm.generate_keypair()
    rm.sign_bundle(bundle, rm.load_private_key(other))
    with pytest.raises(rm.ReleaseError, match="does not trust"):
        rm.verify_bundle(bundle, trusted)
    with pytest.raises(rm.ReleaseError, match="no trusted release key"):
        rm.verify_bundle(bundle, {})
    (bundle / rm.SIGNATURE).write_text("{not json")
    with pytest.raises(rm.ReleaseError, match="unreadable"):
        rm.verify_bundle(bundle, trusted)


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", "a//b", "a\\b",
                                  "./a"])
def test_unsafe_paths_are_refused(path: str) -> None:
    doc = {"version": "1.0", "created_at": "x", "platform": "native", "project_wheel": WHEEL,
           "files": [{"path": path, "sha256": "0" * 64, "size": 1}]}
    with pytest.raises(rm.ReleaseError, match="unsafe path"):
        rm.parse_manifest(json.dumps(doc).encode())


def test_keys_are_ed25519_pem(tmp_path: Path) -> None:
    private, public = rm.generate_keypair()
    assert private.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert len(rm.key_id(rm.load_public_key(public))) == 16
    with pytest.raises(rm.ReleaseError, match="not a PEM public key"):
        rm.load_public_key(b"ssh-ed25519 AAAA")
    (tmp_path / "bad.pub").write_text("nonsense")
    with pytest.raises(rm.ReleaseError, match=r"bad\.pub"):
        rm.load_public_keys([tmp_path])
