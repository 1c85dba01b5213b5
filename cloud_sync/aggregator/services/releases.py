"""Signed releases at the aggregator: trusted public keys, verified bundles, staged rollouts and
what the devices' updaters report (docs/OPERATIONS.md 6.10).

- ``trust_key``: a public key (PEM) releases may be signed with; the private key never comes
  here (``aggregator releases keygen``/``sign`` run in the office).
- ``add_release``: a bundle directory is verified completely (signature by a trusted key, then
  every file's size and sha256) and its files copied, by sha256, to ``data_dir/releases/files``:
  two releases that share a wheel store it once; the devices download files by sha256.
- ``start_rollout``: the release goes to the devices of the canary room first, then to a share
  of the fleet (a stable hash of version and device id), then to all. A stage is complete when
  every device it names has confirmed the release; the rollout then moves on by itself. A
  device that reverts or refuses the release halts the rollout (where and why are kept).
- ``offer_for``: the release meant for a device now (the heartbeat reply, ``GET
  /api/v1/releases/assigned``): only while the rollout is active, not halted and the device's
  stage is reached; ``allowed_now`` is false while a class is in session in the device's room
  (unless the rollout says to install during class).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from cloud_sync import release_manifest as rm
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import Device, DeviceUpdate, Release, ReleaseKey, Rollout
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import audit
from cloud_sync.aggregator.services.common import (
    ConflictError,
    NotFoundError,
    ServiceError,
    utcnow,
)
from cloud_sync.aggregator.services.recordings import is_recording_device
from cloud_sync.aggregator.services.timetable import cached_room, zone
from cloud_sync.protocol import ReleaseOffer, UpdateReport

_LOGGER = logging.getLogger(__name__)

STAGES = ("canary", "share", "all", "done")
HALTING_STATES = ("reverted", "refused")
API = "/api/v1/releases"


def _rollback_on_error(func):  # type: ignore[no-untyped-def]
    """A refused write (ServiceError after begin_write) ends its transaction at once: on
    SQLite, BEGIN IMMEDIATE holds the write lock until the session ends otherwise."""
    import functools

    @functools.wraps(func)
    def wrapper(session: Session, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return func(session, *args, **kwargs)
        except BaseException:
            session.rollback()
            raise

    return wrapper


def files_dir(settings: AggregatorSettings) -> Path:
    return settings.data_dir / "releases" / "files"


def incoming_dir(settings: AggregatorSettings) -> Path:
    """Uploads and unpacked archives on their way in (removed once added or refused)."""
    return settings.data_dir / "releases" / "incoming"


# -- keys -------------------------------------------------------------------------------------

@_rollback_on_error
def trust_key(session: Session, pem: bytes, actor: str) -> str:
    """Add a public key releases may be signed with; returns its key id."""
    try:
        key = rm.load_public_key(pem)
    except rm.ReleaseError as err:
        raise ServiceError(str(err)) from err
    kid = rm.key_id(key)
    begin_write(session)
    if session.get(ReleaseKey, kid) is None:
        session.add(ReleaseKey(key_id=kid, public_pem=rm.public_pem(key).decode(),
                               added_at=utcnow()))
        audit.record(session, actor, "release.trust_key", f"release_key:{kid}")
    session.commit()
    return kid


def trusted_keys(session: Session) -> dict[str, object]:
    return {row.key_id: rm.load_public_key(row.public_pem.encode())
            for row in session.scalars(select(ReleaseKey))}


# -- releases ---------------------------------------------------------------------------------

@_rollback_on_error
def add_release(session: Session, settings: AggregatorSettings, bundle: Path,
                actor: str) -> Release:
    """Verify ``bundle`` (signature by a trusted key, every file) and store it. Adding the same
    release again is a no-op; another bundle under a version already held is a conflict."""
    keys = trusted_keys(session)
    if not keys:
        raise ServiceError("no trusted release key: run `aggregator releases trust "
                           "release-signing.pub` first (the public key only)")
    _check_signer(bundle, keys)
    try:
        manifest, signer = rm.verify_bundle(bundle, keys, require_signature=True)  # type: ignore[arg-type]
        data = (bundle / rm.MANIFEST).read_bytes()
        signature = (bundle / rm.SIGNATURE).read_bytes()
    except rm.ReleaseError as err:
        raise ServiceError(f"refused: {err}") from err
    except OSError as err:
        raise ServiceError(f"{bundle}: {err}") from err
    existing = session.get(Release, manifest.version)
    if existing is not None:
        if bytes(existing.manifest) != data:
            raise ConflictError(f"release {manifest.version} exists with another manifest")
        return existing
    store = files_dir(settings)
    store.mkdir(parents=True, exist_ok=True)
    for entry in manifest.files:
        target = store / entry.sha256
        if target.is_file() and target.stat().st_size == entry.size:
            continue
        tmp = store / f".{entry.sha256}.{os.getpid()}.tmp"
        shutil.copyfile(bundle / entry.path, tmp)
        if rm.sha256_file(tmp) != entry.sha256:  # changed while being copied
            tmp.unlink()
            raise ServiceError(f"refused: {entry.path} changed while it was copied")
        os.replace(tmp, target)
    begin_write(session)
    row = Release(version=manifest.version, key_id=signer or "", manifest=data,
                  signature=signature, files=len(manifest.files),
                  total_bytes=manifest.total_bytes(), added_at=utcnow(), added_by=actor[:200])
    session.add(row)
    audit.record(session, actor, "release.add", f"release:{manifest.version}",
                 f"{len(manifest.files)} files, key {signer}")
    session.commit()
    _LOGGER.info("release %s added (%d files, signed by %s)", manifest.version,
                 len(manifest.files), signer)
    return row


def _check_signer(bundle: Path, keys: dict[str, object]) -> None:
    """The plain refusal of a bundle signed by a key the aggregator does not trust."""
    try:
        sig = rm.Signature.model_validate_json((bundle / rm.SIGNATURE).read_bytes())
    except (OSError, ValueError):
        return  # missing or unreadable: verify_bundle says which
    if sig.key_id not in keys:
        raise ServiceError(f"refused: not signed by a trusted key (signed by key {sig.key_id}, "
                           "which the aggregator does not trust; trusted: "
                           f"{', '.join(sorted(keys))})")


@_rollback_on_error
def add_release_archive(session: Session, settings: AggregatorSettings, archive: Path,
                        actor: str) -> Release:
    """``add_release`` of the bundle in ``archive`` (.tar/.tar.gz, untrusted: unpacked by
    ``release_archive.unpack``'s checks into a directory of its own under ``incoming_dir``,
    removed again whatever happens)."""
    from cloud_sync import release_archive

    incoming = incoming_dir(settings)
    incoming.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="unpacked-", dir=incoming))
    try:
        try:
            bundle = release_archive.unpack(archive, work,
                                            max_bytes=settings.release_upload_max_bytes)
        except release_archive.ArchiveError as err:
            raise ServiceError(f"refused: {err}") from err
        return add_release(session, settings, bundle, actor)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def get_release(session: Session, version: str) -> Release:
    row = session.get(Release, version)
    if row is None:
        raise NotFoundError(f"release {version!r} does not exist")
    return row


def list_releases(session: Session) -> list[Release]:
    return list(session.scalars(select(Release).order_by(Release.added_at.desc())))


def file_path(session: Session, settings: AggregatorSettings, sha256: str) -> Path:
    """The stored file with this sha256, when a release lists it (404 otherwise)."""
    path = files_dir(settings) / sha256
    if not path.is_file():
        raise NotFoundError("no release file with this sha256")
    return path


# -- rollouts ---------------------------------------------------------------------------------

def active_rollout(session: Session) -> Rollout | None:
    return session.scalars(select(Rollout).where(Rollout.active.is_(True))
                           .order_by(Rollout.id.desc()).limit(1)).first()


def list_rollouts(session: Session, limit: int = 20) -> list[Rollout]:
    return list(session.scalars(select(Rollout).order_by(Rollout.id.desc()).limit(limit)))


@_rollback_on_error
def start_rollout(session: Session, version: str, canary_room: str, share_pct: int,
                  actor: str, *, during_class: bool = False,
                  max_bytes_per_s: int | None = None) -> Rollout:
    """Start rolling ``version`` out (the active rollout before it is superseded)."""
    if not 0 <= share_pct <= 100:
        raise ServiceError("share_pct must be 0..100")
    if max_bytes_per_s is not None and not 10_000 <= max_bytes_per_s <= 1_000_000_000:
        raise ServiceError("max_bytes_per_s must be 10000..1000000000")
    begin_write(session)
    get_release(session, version)
    canaries = [d for d in session.scalars(select(Device).where(Device.room_id == canary_room))
                if not is_recording_device(d.id)]
    if not canaries:
        raise ServiceError(f"no device in canary room {canary_room!r}: a rollout starts on "
                           "the devices of one room")
    session.execute(update(Rollout).where(Rollout.active.is_(True)).values(active=False))
    now = utcnow()
    row = Rollout(version=version, canary_room=canary_room, share_pct=share_pct,
                  stage="canary", during_class=during_class, max_bytes_per_s=max_bytes_per_s,
                  active=True, started_at=now, stage_at=now, started_by=actor[:200])
    session.add(row)
    audit.record(session, actor, "rollout.start", f"release:{version}",
                 f"canary room {canary_room}, then {share_pct}%, then all")
    session.flush()
    _advance(session, row)
    session.commit()
    _LOGGER.info("rollout of %s started: canary room %s", version, canary_room)
    return row


def _active_for_change(session: Session) -> Rollout:
    """The active rollout, in a write transaction (halt, resume, promote); 404 without one."""
    begin_write(session)
    row = active_rollout(session)
    if row is None:
        raise NotFoundError("no active rollout")
    return row


@_rollback_on_error
def halt_rollout(session: Session, actor: str, reason: str) -> Rollout:
    row = _active_for_change(session)
    if row.halted_at is None:
        row.halted_at, row.halted_reason = utcnow(), f"halted by {actor}: {reason}"[:700]
        audit.record(session, actor, "rollout.halt", f"release:{row.version}", reason)
    session.commit()
    return row


@_rollback_on_error
def resume_rollout(session: Session, actor: str) -> Rollout:
    """Clear a halt (after the cause is understood); the stage stays where it was."""
    row = _active_for_change(session)
    if row.halted_at is not None:
        audit.record(session, actor, "rollout.resume", f"release:{row.version}",
                     row.halted_reason or "")
        row.halted_at = row.halted_reason = None
        _advance(session, row)
    session.commit()
    return row


@_rollback_on_error
def promote_rollout(session: Session, actor: str) -> Rollout:
    """Move the active rollout to its next stage now (without waiting for confirmations)."""
    row = _active_for_change(session)
    if row.halted_at is not None:
        raise ConflictError(f"the rollout is halted ({row.halted_reason}); resume it first")
    if row.stage != "done":
        row.stage = STAGES[STAGES.index(row.stage) + 1]
        row.stage_at = utcnow()
        audit.record(session, actor, "rollout.promote", f"release:{row.version}", row.stage)
    session.commit()
    return row


def bucket(version: str, device_id: str) -> int:
    """0..99, stable per release and device: who is in the share."""
    return int(hashlib.sha256(f"{version}\n{device_id}".encode()).hexdigest()[:8], 16) % 100


def stage_of(rollout: Rollout, device_id: str, room_id: str) -> str:
    """The first stage that names this device."""
    if room_id == rollout.canary_room:
        return "canary"
    if bucket(rollout.version, device_id) < rollout.share_pct:
        return "share"
    return "all"


def eligible(rollout: Rollout, device_id: str, room_id: str) -> bool:
    return STAGES.index(stage_of(rollout, device_id, room_id)) <= STAGES.index(rollout.stage)


def _running(session: Session, version: str) -> set[str]:
    """Devices that confirmed ``version``. A heartbeat with the version is not enough: a
    release on trial heartbeats too, and may still be reverted."""
    return set(session.scalars(select(DeviceUpdate.device_id).where(
        DeviceUpdate.version == version, DeviceUpdate.state == "confirmed")))


def _advance(session: Session, rollout: Rollout) -> None:
    """Move on while every device the current stage names runs the release."""
    if rollout.halted_at is not None or not rollout.active:
        return
    devices = [d for d in session.scalars(select(Device)) if not is_recording_device(d.id)]
    running = _running(session, rollout.version)
    while rollout.stage != "done":
        named = [d for d in devices if eligible(rollout, d.id, d.room_id)]
        if not all(d.id in running for d in named):
            return
        rollout.stage = STAGES[STAGES.index(rollout.stage) + 1]
        rollout.stage_at = utcnow()
        audit.record(session, "aggregator", "rollout.stage", f"release:{rollout.version}",
                     f"{rollout.stage} ({len(named)} device(s) confirmed before)")
        _LOGGER.info("rollout of %s: stage %s", rollout.version, rollout.stage)


# -- devices ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RolloutSnapshot:
    """What the heartbeat path needs of the active rollout (cached a few seconds)."""

    version: str
    canary_room: str
    share_pct: int
    stage: str
    during_class: bool
    max_bytes_per_s: int | None

    def eligible(self, device_id: str, room_id: str) -> bool:
        return eligible(self, device_id, room_id)  # type: ignore[arg-type]


def snapshot(session: Session) -> RolloutSnapshot | None:
    row = active_rollout(session)
    if row is None or row.halted_at is not None:
        return None
    return RolloutSnapshot(row.version, row.canary_room, row.share_pct, row.stage,
                           row.during_class, row.max_bytes_per_s)


class SnapshotCache:
    """The active rollout, read at most every ``ttl_s`` seconds per process (a halt or a new
    stage reaches every process within that time)."""

    def __init__(self, ttl_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        self._at = -1e9
        self._value: RolloutSnapshot | None = None

    @property
    def value(self) -> RolloutSnapshot | None:
        return self._value

    def fresh(self) -> bool:
        return time.monotonic() - self._at <= self.ttl_s

    def get(self, session: Session) -> RolloutSnapshot | None:
        if not self.fresh():
            self._value = snapshot(session)
            self._at = time.monotonic()
        return self._value

    def clear(self) -> None:
        self._at = -1e9


def class_in_session(session: Session, room_id: str, at: datetime) -> str | None:
    """The course in session in the room at ``at`` (None: none)."""
    room = cached_room(session, room_id)
    if room is None:
        return None
    day = at.astimezone(zone(room.timezone)).date()
    for o in room.timetable.occurrences(day, room_id):
        if o.starts_at <= at < o.ends_at:
            return o.course_id
    return None


def offer_for(session: Session, found: RolloutSnapshot | None, device_id: str, room_id: str,
              running: str | None, at: datetime | None = None) -> ReleaseOffer | None:
    """The release meant for this device now, or None (stay on what it runs)."""
    if found is None or found.version == running or not found.eligible(device_id, room_id):
        return None
    reason = None
    if not found.during_class:
        course = class_in_session(session, room_id, at or utcnow())
        if course is not None:
            reason = f"class {course} in session"
    base = f"{API}/{found.version}"
    return ReleaseOffer(version=found.version, manifest_url=f"{base}/manifest.json",
                        signature_url=f"{base}/manifest.sig", files_url=f"{API}/files/",
                        allowed_now=reason is None, window_reason=reason,
                        max_bytes_per_s=found.max_bytes_per_s)


@_rollback_on_error
def record_report(session: Session, device_id: str, report: UpdateReport) -> bool:
    """Keep a device's update report (once: the heartbeat repeats the last one); a revert or a
    refusal of the active rollout's release halts it, a confirmation may end a stage. Returns
    whether the report was new. Commits."""
    begin_write(session)
    if session.get(Device, device_id) is None:
        raise NotFoundError(f"device {device_id!r} does not exist")
    seen = session.scalar(select(func.count()).select_from(DeviceUpdate).where(and_(
        DeviceUpdate.device_id == device_id, DeviceUpdate.at == report.at,
        DeviceUpdate.state == report.state)))
    if seen:
        session.rollback()
        return False
    session.add(DeviceUpdate(device_id=device_id, state=report.state, version=report.version,
                             running=report.running, reason=report.reason, at=report.at,
                             received_at=utcnow()))
    rollout = active_rollout(session)
    if rollout is not None and report.version == rollout.version:
        if report.state in HALTING_STATES and rollout.halted_at is None:
            rollout.halted_at = utcnow()
            rollout.halted_reason = (f"{device_id} {report.state} {report.version}: "
                                     f"{report.reason or 'no reason given'}")[:700]
            audit.record(session, f"device:{device_id}", "rollout.halt",
                         f"release:{rollout.version}", rollout.halted_reason)
            _LOGGER.warning("rollout of %s halted: %s", rollout.version, rollout.halted_reason)
        elif report.state == "confirmed":
            session.flush()
            _advance(session, rollout)
    session.commit()
    return True


@dataclass
class DeviceUpdateView:
    device_id: str
    state: str | None
    version: str | None
    reason: str | None
    at: datetime | None
    history: list[DeviceUpdate]


def device_updates(session: Session, device_ids: list[str],
                   per_device: int = 5) -> dict[str, DeviceUpdateView]:
    """The last reports of each device (newest first)."""
    out = {d: DeviceUpdateView(d, None, None, None, None, []) for d in device_ids}
    if not device_ids:
        return out
    rows = session.scalars(select(DeviceUpdate).where(DeviceUpdate.device_id.in_(device_ids))
                           .order_by(DeviceUpdate.at.desc(), DeviceUpdate.id.desc())
                           .limit(50 * len(device_ids)))
    for row in rows:
        view = out[row.device_id]
        if len(view.history) < per_device:
            view.history.append(row)
        if view.state is None:
            view.state, view.version, view.reason, view.at = (row.state, row.version,
                                                              row.reason, row.at)
    return out
