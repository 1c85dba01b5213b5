"""Signed release bundles: the manifest, its ed25519 signature and their checks.

Shared by the three programs that handle a release (it imports neither side): the builder
(``fleet.bundle`` writes the manifest, ``aggregator releases sign`` signs it in the office), the
aggregator (``releases add`` refuses a bundle it cannot verify) and the device (the updater and
``make deploy``'s apply verify every file before anything is installed).

A bundle directory holds ``manifest.json`` (every other file with its sha256 and size) and,
when signed, ``manifest.sig`` (the signature of manifest.json's exact bytes)::

    {"format": 1, "project": "classroom-attendance", "version": "0.1.0+g1a2b3c4d",
     "created_at": "...Z", "platform": "arm64",
     "project_wheel": "wheels/classroom_attendance-0.1.0+g1a2b3c4d-py3-none-any.whl",
     "files": [{"path": "VERSION", "sha256": "...", "size": 16}, ...]}

    {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64, 64 bytes>"}

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public); ``key_id`` is the first 16
hex digits of the sha256 of the raw 32-byte public key. Signing uses ``cryptography`` (PyCA).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = 1
PROJECT = "classroom-attendance"
MAX_FILES = 5000
MAX_MANIFEST_BYTES = 2 * 1024 * 1024
CHUNK = 1024 * 1024
PUBLIC_KEY_SUFFIX = ".pub"
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# a release version as a path component: pyproject's version plus +g<commit>[.dirty]
Version = Annotated[str, Field(min_length=1, max_length=64,
                               pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")]


class ReleaseError(ValueError):
    """A bundle or signature failed a check; the message says which file and why."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=300)
    sha256: Sha256
    size: int = Field(ge=0, le=2**40)

    @field_validator("path")
    @classmethod
    def _safe(cls, value: str) -> str:
        return safe_path(value)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal[1] = FORMAT
    project: Literal["classroom-attendance"] = PROJECT
    version: Version
    created_at: str = Field(max_length=40)
    platform: str = Field(max_length=40)
    project_wheel: str = Field(max_length=300)
    files: list[FileEntry] = Field(max_length=MAX_FILES)

    @field_validator("files")
    @classmethod
    def _unique(cls, files: list[FileEntry]) -> list[FileEntry]:
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("a path is listed twice")
        if {MANIFEST, SIGNATURE} & set(paths):
            raise ValueError("the manifest cannot list itself or its signature")
        return files

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alg: Literal["ed25519"] = "ed25519"
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    signature: str = Field(max_length=200)


def safe_path(value: str) -> str:
    """A relative POSIX path inside the bundle (no ``..``, not absolute, no backslash)."""
    path = PurePosixPath(value)
    if (path.is_absolute() or "\\" in value or any(p in ("..", ".", "") for p in path.parts)
            or str(path) != value):
        raise ValueError(f"unsafe path in manifest: {value!r}")
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(bundle: Path) -> list[str]:
    """Every regular file of the bundle (relative paths) except the manifest and signature.
    Raises on a symlink or anything that is not a plain file or directory."""
    out = []
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if path.is_symlink():
            raise ReleaseError(f"{rel}: a symlink (bundles hold plain files only)")
        if path.is_dir():
            continue
        if not path.is_file():
            raise ReleaseError(f"{rel}: not a regular file")
        if rel not in (MANIFEST, SIGNATURE):
            out.append(rel)
    return out


def write_manifest(bundle: Path, *, version: str, platform: str, project_wheel: str,
                   created_at: datetime | None = None) -> bytes:
    """Hash every file of ``bundle`` into ``bundle/manifest.json`` (replacing a manifest and a
    signature already there: a changed bundle needs a new signature). Returns the bytes."""
    (bundle / SIGNATURE).unlink(missing_ok=True)
    files = [FileEntry(path=rel, sha256=sha256_file(bundle / rel),
                       size=(bundle / rel).stat().st_size) for rel in bundle_files(bundle)]
    when = (created_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = Manifest(version=version, created_at=when, platform=platform,
                        project_wheel=project_wheel, files=files)
    if project_wheel not in manifest.by_path():
        raise ReleaseError(f"project wheel {project_wheel} is not in the bundle")
    data = (json.dumps(manifest.model_dump(), indent=1, sort_keys=True) + "\n").encode()
    _atomic_write(bundle / MANIFEST, data)
    return data


def parse_manifest(data: bytes) -> Manifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise ReleaseError(f"manifest of {len(data)} bytes is too large")
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ReleaseError(f"manifest unreadable: {where}: {first['msg']}") from err


# --- keys --------------------------------------------------------------------------------------

def generate_keypair() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) of a new ed25519 key."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    return private_pem, public_pem(private.public_key())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise ReleaseError(f"not an unencrypted PEM private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ReleaseError("the signing key is not an ed25519 key")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as err:
        raise ReleaseError(f"not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError("the public key is not an ed25519 key")
    return key


def load_public_keys(sources: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Trusted keys by key id, from ``*.pub`` files and directories holding them."""
    keys: dict[str, Ed25519PublicKey] = {}
    for source in sources:
        files = sorted(source.glob(f"*{PUBLIC_KEY_SUFFIX}")) if source.is_dir() else [source]
        for path in files:
            if not path.is_file():
                continue
            try:
                key = load_public_key(path.read_bytes())
            except ReleaseError as err:
                raise ReleaseError(f"{path}: {err}") from err
            keys[key_id(key)] = key
    return keys


# --- signatures ------------------------------------------------------------------------------

def sign_manifest(manifest: bytes, private: Ed25519PrivateKey) -> bytes:
    parse_manifest(manifest)  # never sign something the devices will refuse to read
    sig = Signature(key_id=key_id(private.public_key()),
                    signature=base64.b64encode(private.sign(manifest)).decode())
    return (sig.model_dump_json() + "\n").encode()


def sign_bundle(bundle: Path, private: Ed25519PrivateKey) -> str:
    """Write ``bundle/manifest.sig`` for the manifest there; returns the key id."""
    manifest = (bundle / MANIFEST).read_bytes()
    verify_files(bundle, parse_manifest(manifest))  # sign only what the manifest describes
    data = sign_manifest(manifest, private)
    _atomic_write(bundle / SIGNATURE, data)
    return Signature.model_validate_json(data).key_id


def verify_signature(manifest: bytes, signature: bytes,
                     keys: Mapping[str, Ed25519PublicKey]) -> str:
    """The key id that signed ``manifest``; raises :class:`ReleaseError` otherwise."""
    try:
        sig = Signature.model_validate_json(signature)
        raw = base64.b64decode(sig.signature, validate=True)
    except (ValidationError, ValueError, binascii.Error) as err:
        raise ReleaseError("signature file unreadable") from err
    key = keys.get(sig.key_id)
    if key is None:
        raise ReleaseError(f"signed by key {sig.key_id}, which this device does not trust"
                           + (f" (trusted: {', '.join(sorted(keys))})" if keys else
                              " (no trusted release key installed)"))
    try:
        key.verify(raw, manifest)
    except InvalidSignature as err:
        raise ReleaseError(f"bad signature (key {sig.key_id}): the manifest was changed "
                           "after signing or signed by another key") from err
    return sig.key_id


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Every listed file present with its size and sha256; nothing unlisted."""
    listed = manifest.by_path()
    present = bundle_files(bundle)
    extra = sorted(set(present) - set(listed))
    if extra:
        raise ReleaseError(f"{extra[0]}: in the bundle but not in the manifest"
                           + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for entry in manifest.files:
        path = bundle / entry.path
        if not path.is_file():
            raise ReleaseError(f"{entry.path}: missing")
        size = path.stat().st_size
        if size != entry.size:
            raise ReleaseError(f"{entry.path}: changed since signing ({size} bytes, the "
                               f"manifest says {entry.size})")
        if sha256_file(path) != entry.sha256:
            raise ReleaseError(f"{entry.path}: changed since signing (sha256 differs from "
                               "the manifest)")


def verify_bundle(bundle: Path, keys: Mapping[str, Ed25519PublicKey] | None, *,
                  require_signature: bool = True) -> tuple[Manifest, str | None]:
    """Check ``bundle`` completely: the signature (when ``require_signature`` or the bundle
    is signed and keys are given), then every file. Returns (manifest, signing key id)."""
    try:
        data = (bundle / MANIFEST).read_bytes()
    except FileNotFoundError as err:
        raise ReleaseError(f"{bundle}: no {MANIFEST} (not a release bundle)") from err
    manifest = parse_manifest(data)
    signer = None
    sig_path = bundle / SIGNATURE
    if sig_path.exists() and (keys or require_signature):
        signer = verify_signature(data, sig_path.read_bytes(), keys or {})
    elif require_signature:
        raise ReleaseError(f"{bundle}: unsigned ({SIGNATURE} missing)")
    verify_files(bundle, manifest)
    version_file = bundle / "VERSION"
    if version_file.is_file() and version_file.read_text().strip() != manifest.version:
        raise ReleaseError("VERSION does not match the manifest's version")
    return manifest, signer


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
