"""Small helpers and the service-level errors the API maps to HTTP status codes."""

from __future__ import annotations

from datetime import UTC, datetime


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
