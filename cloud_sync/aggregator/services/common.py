"""Small helpers and the service-level errors the API maps to HTTP status codes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting like a formula
    (``=HYPERLINK(``, ``+``, ``-``, ``@``, a tab or carriage return: OWASP's list) gets a
    leading apostrophe, so a student named ``=HYPERLINK(...)`` is not a live formula in the
    office's spreadsheet. None is the empty cell."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP code the API answers with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, str]:
        """The JSON answer: FastAPI's ``{"detail": ...}``."""
        return {"detail": self.message}


class NotFoundError(ServiceError):
    status = 404


class ConflictError(ServiceError):
    status = 409


class ForbiddenError(ServiceError):
    status = 403


class UnavailableError(ServiceError):
    status = 503


ROOM_MISMATCH = "room_mismatch"


class RoomMismatchError(ForbiddenError):
    """A device whose key is valid speaks for another room than the one it is registered to
    (``device.room_id`` in its config differs from the aggregator's registration). Answered
    as 403 with ``code`` ``room_mismatch`` and both rooms, so the device and the console can
    name the real cause instead of "key refused" (issue 25 item 8)."""

    code = ROOM_MISMATCH

    def __init__(self, device_id: str, registered_room: str, configured_room: str) -> None:
        super().__init__(
            f"room mismatch: device {device_id!r} is registered to room {registered_room!r} "
            f"but configured for {configured_room!r}: change the device's device.room_id to "
            f"{registered_room!r}, or move the device to {configured_room!r} on the "
            "aggregator (console Devices > Manage > Move)")
        self.device_id = device_id
        self.registered_room = registered_room
        self.configured_room = configured_room

    def body(self) -> dict[str, str]:
        """The JSON answer: ``detail`` (for people) and the machine-readable fields."""
        return {"detail": self.message, "code": self.code, "device_id": self.device_id,
                "registered_room": self.registered_room,
                "configured_room": self.configured_room}


def utcnow() -> datetime:
    return datetime.now(UTC)
