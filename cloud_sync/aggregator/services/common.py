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


class NotFoundError(ServiceError):
    status = 404


class ConflictError(ServiceError):
    status = 409


class ForbiddenError(ServiceError):
    status = 403


class UnavailableError(ServiceError):
    status = 503


def utcnow() -> datetime:
    return datetime.now(UTC)
