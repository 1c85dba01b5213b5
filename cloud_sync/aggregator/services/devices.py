"""Devices and admin tokens: creation (the secret is returned once) and authentication."""

from __future__ import annotations

import hmac
import logging
import secrets
from datetime import datetime, timedelta

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_sync.aggregator.db.models import AdminToken, Device, EventRow, Room
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import audit
from cloud_sync.aggregator.services.common import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServiceError,
    utcnow,
)
from cloud_sync.aggregator.services.security import (
    ADMIN_PREFIX,
    DEVICE_PREFIX,
    hash_secret,
    new_secret,
)
from cloud_sync.protocol import DeviceId

_LOGGER = logging.getLogger(__name__)
_DEVICE_ID: TypeAdapter[str] = TypeAdapter(DeviceId)
TOKEN_USE_RESOLUTION = timedelta(minutes=1)


def authenticate_device(session: Session, api_key: str) -> Device | None:
    """The device whose key is ``api_key``, or None. The key is looked up by its sha256 (an
    index probe on a 256-bit random value) and the digest compared in constant time."""
    if not api_key.startswith(DEVICE_PREFIX):
        return None
    digest = hash_secret(api_key)
    device = session.scalars(select(Device).where(Device.key_hash == digest)).first()
    if device is None or not hmac.compare_digest(device.key_hash, digest):
        return None
    return device


def authenticate_admin(session: Session, token: str, *, record_use: bool = False
                       ) -> AdminToken | None:
    """The token row whose secret is ``token``, or None. ``record_use``: set its
    ``last_used_at`` (at most once a minute; commits)."""
    if not token.startswith(ADMIN_PREFIX):
        return None
    digest = hash_secret(token)
    row = session.scalars(select(AdminToken).where(AdminToken.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    now = utcnow()
    if record_use and (row.last_used_at is None
                       or now - row.last_used_at > TOKEN_USE_RESOLUTION):
        _record_use(session, row.id, now)
    return row


def _record_use(session: Session, token_id: int, now: datetime) -> None:
    """Bookkeeping only: its own write transaction (SQLite: BEGIN IMMEDIATE, so it queues
    behind other writers instead of failing to upgrade a read lock); a failure never refuses
    the request."""
    session.rollback()
    try:
        begin_write(session)
        session.execute(update(AdminToken).where(AdminToken.id == token_id)
                        .values(last_used_at=now))
        session.commit()
    except SQLAlchemyError as err:
        session.rollback()
        _LOGGER.warning("admin token %d: last use not recorded (%s)", token_id, err)


def list_admin_tokens(session: Session) -> list[AdminToken]:
    """Every admin token (never the secret: only its id, name and times), oldest first."""
    return list(session.scalars(select(AdminToken).order_by(AdminToken.id)))


def revoke_admin_token(session: Session, token_id: int) -> AdminToken:
    """Delete the token: it stops working at once in this process (callers clear the
    credential cache), within ``auth_cache_s`` in a running server when done elsewhere."""
    begin_write(session)
    row = session.get(AdminToken, token_id)
    if row is None:
        raise NotFoundError(f"admin token {token_id} does not exist")
    session.delete(row)
    session.commit()
    _LOGGER.info("admin token %d (%r) revoked", token_id, row.name)
    return row


def add_device(session: Session, room_id: str, device_id: str | None = None, *,
               recording: bool = False) -> tuple[Device, str]:
    """Register a device in ``room_id``; returns it and its API key (shown once, stored hashed).
    ``recording``: the room's ``rec-<room>`` device of recorded sessions (services/
    recording_job.py), the only way to get a reserved id. Commits."""
    if device_id is not None and not recording:
        try:
            device_id = _DEVICE_ID.validate_python(device_id)
        except ValidationError as err:
            raise ServiceError(f"invalid device id: {err.errors()[0]['msg']}") from err
    begin_write(session)
    if session.get(Room, room_id) is None:
        raise NotFoundError(f"room {room_id!r} does not exist")
    device_id = device_id or f"dev-{room_id.lower()}-{secrets.token_hex(3)}"
    if session.get(Device, device_id) is not None:
        raise ConflictError(f"device {device_id!r} already exists")
    key = new_secret(DEVICE_PREFIX)
    device = Device(id=device_id, room_id=room_id, key_hash=hash_secret(key), created_at=utcnow())
    session.add(device)
    session.commit()
    _LOGGER.info("device %s added in room %s", device_id, room_id)
    return device, key


def rotate_device_key(session: Session, device_id: str) -> str:
    begin_write(session)
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} does not exist")
    key = new_secret(DEVICE_PREFIX)
    device.key_hash = hash_secret(key)
    session.commit()
    _LOGGER.info("device %s key rotated", device_id)
    return key


REFUSAL_RESOLUTION = timedelta(seconds=10)


def note_refusal(session: Session, device_id: str, reason: str, claimed_room: str) -> None:
    """Record on the device's row that a contact with its valid key was refused (``reason``:
    ``room_mismatch``; ``claimed_room``: the room it said it was in), so the console can say
    why a device that talks to us is "offline". At most one write per device every
    REFUSAL_RESOLUTION (a refused device retries every minute per kind of request);
    bookkeeping only: a failure is logged, never raised."""
    session.rollback()
    now = utcnow()
    try:
        begin_write(session)
        table = Device.__table__
        session.execute(
            update(table).where(
                table.c.id == device_id,
                (table.c.refused_at.is_(None)) | (table.c.refused_at < now - REFUSAL_RESOLUTION)
                | (table.c.refused_room != claimed_room[:64]),
            ).values(refused_at=now, refused_reason=reason[:32], refused_room=claimed_room[:64]))
        session.commit()
    except SQLAlchemyError as err:
        session.rollback()
        _LOGGER.warning("device %s: refused contact not recorded (%s)", device_id, err)


STORE_KEY_BYTES = 32


def release_store_key(session: Session, device_id: str) -> tuple[bytes, bool]:
    """The key of the device's encrypted store, made on its first request; (key, created).
    Every release is in the audit log (actor ``device:<id>``). Commits. A device that was
    deleted (deregistered) gets ``ForbiddenError``: its key went with it."""
    begin_write(session)
    device = session.get(Device, device_id)
    if device is None:
        raise ForbiddenError(f"device {device_id!r} is not registered")
    created = device.store_key is None
    if created:
        device.store_key = secrets.token_bytes(STORE_KEY_BYTES)
    key = bytes(device.store_key)  # type: ignore[arg-type]
    audit.record(session, f"device:{device_id}", "device.store_key", f"device:{device_id}",
                 "created" if created else "released")
    session.commit()
    return key, created


def create_admin_token(session: Session, name: str = "admin") -> tuple[AdminToken, str]:
    begin_write(session)
    token = new_secret(ADMIN_PREFIX)
    row = AdminToken(name=name, token_hash=hash_secret(token), created_at=utcnow())
    session.add(row)
    session.commit()
    _LOGGER.info("admin token %r created", name)
    return row, token


def list_events(
    session: Session,
    *,
    device_id: str | None = None,
    room_id: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[EventRow]:
    """Device events (alerts, starts, roster switches), newest first, filtered."""
    query = select(EventRow)
    if device_id is not None:
        query = query.where(EventRow.device_id == device_id)
    if room_id is not None:
        query = query.where(EventRow.room_id == room_id)
    if kind is not None:
        query = query.where(EventRow.kind == kind)
    if since is not None:
        query = query.where(EventRow.at >= since)
    query = query.order_by(EventRow.at.desc(), EventRow.received_at.desc())
    return list(session.scalars(query.limit(limit).offset(offset)))
