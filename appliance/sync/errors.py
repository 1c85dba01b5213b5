"""What a transport raises; the agent decides what to do with each."""

from __future__ import annotations


class TransportError(Exception):
    """A temporary failure (network down, 5xx, 429, no ack in time): retry later, lose nothing."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CredentialsRefusedError(TransportError):
    """The aggregator refused the device's key (401/403): deregistered, or its key rotated."""


class RoomMismatchError(CredentialsRefusedError):
    """The aggregator took the device's key but has it registered to another room than
    ``device.room_id`` says (403 ``room_mismatch``): a configuration problem, not a key one.
    Records are kept; an operator changes ``device.room_id`` or moves the device."""

    def __init__(self, message: str, registered_room: str, configured_room: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s)
        self.registered_room = registered_room
        self.configured_room = configured_room


class BatchRefusedError(Exception):
    """The aggregator refused the whole batch as malformed (HTTP 400/413/422).

    The agent splits the batch to find the poison record and parks it with this reason.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotSupportedError(Exception):
    """The aggregator does not offer this operation (e.g. no HTTP endpoint for events)."""
