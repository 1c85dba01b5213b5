"""Where releases live on the device and what the updater is doing (files under PREFIX).

::

    PREFIX/current -> releases/<version>     what the units run
    PREFIX/previous -> releases/<version>    the release to go back to
    PREFIX/releases/<version>/               thin venv (project wheel, models, .deps, .installed)
    PREFIX/deps/<key>/                       the dependencies' venv, shared by releases
    PREFIX/bundles/<version>/                verified bundles of the kept releases
    PREFIX/incoming/<version>/               make deploy's upload (files the device lacked)
    PREFIX/update/state.json                 the last UpdateReport (world-readable)
    PREFIX/update/history.jsonl              every report, one per line
    PREFIX/update/pending.json               the release on trial
    PREFIX/update/download/<version>/        a pulled release being downloaded
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cloud_sync.protocol import UpdateReport

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
HISTORY_KEEP = 200  # lines of history.jsonl kept on the device


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def switch_link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` atomically (a new symlink renamed over the old one)."""
    tmp = link.with_name(f".{link.name}.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


@dataclass(frozen=True)
class Layout:
    prefix: Path

    @property
    def current(self) -> Path:
        return self.prefix / "current"

    @property
    def previous(self) -> Path:
        return self.prefix / "previous"

    @property
    def releases(self) -> Path:
        return self.prefix / "releases"

    @property
    def deps(self) -> Path:
        return self.prefix / "deps"

    @property
    def bundles(self) -> Path:
        return self.prefix / "bundles"

    @property
    def incoming(self) -> Path:
        return self.prefix / "incoming"

    @property
    def update(self) -> Path:
        return self.prefix / "update"

    @property
    def state_file(self) -> Path:
        return self.update / "state.json"

    @property
    def history_file(self) -> Path:
        return self.update / "history.jsonl"

    @property
    def pending_file(self) -> Path:
        return self.update / "pending.json"

    @property
    def download(self) -> Path:
        return self.update / "download"

    def release(self, version: str) -> Path:
        return self.releases / version

    def link_version(self, link: Path) -> str | None:
        try:
            return os.readlink(link).removeprefix("releases/")
        except OSError:
            return None

    def installed(self, version: str) -> bool:
        return (self.release(version) / ".installed").exists()

    @contextlib.contextmanager
    def lock(self, *, wait: bool = True) -> Iterator[bool]:
        """One updater at a time (apply, trial, check); yields False when ``wait`` is off and
        another holds it."""
        self.update.mkdir(parents=True, exist_ok=True)
        with (self.update / ".lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def now() -> datetime:
    return datetime.now(UTC)


def read_report(layout: Layout) -> UpdateReport | None:
    """The last report (None before any update; a damaged file counts as none)."""
    try:
        return UpdateReport.model_validate_json(layout.state_file.read_bytes())
    except (OSError, ValueError):
        return None


def write_report(layout: Layout, report: UpdateReport) -> None:
    data = report.model_dump_json().encode()
    write_atomic(layout.state_file, data + b"\n")
    with layout.history_file.open("ab") as fh:
        fh.write(data + b"\n")
    _trim(layout.history_file)


def read_history(layout: Layout, limit: int = 50) -> list[UpdateReport]:
    try:
        lines = layout.history_file.read_bytes().splitlines()[-limit:]
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(UpdateReport.model_validate_json(line))
    return out


def _trim(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) > 2 * HISTORY_KEEP:
        write_atomic(path, b"".join(lines[-HISTORY_KEEP:]))


def read_pending(layout: Layout) -> dict[str, object] | None:
    try:
        doc = json.loads(layout.pending_file.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") else None


def write_pending(layout: Layout, doc: dict[str, object]) -> None:
    write_atomic(layout.pending_file, json.dumps(doc, indent=1).encode() + b"\n")
