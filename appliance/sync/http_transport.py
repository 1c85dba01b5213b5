"""HTTP transport of the sync agent (httpx): batches, events, heartbeats, the schedule pull.

Every request carries ``Authorization: Bearer <device key>``; the key is never logged (httpx
logs the method and URL only, and our own messages name the device, never the key).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import httpx
from pydantic import SecretStr, ValidationError

from appliance.sync.errors import (
    BatchRefusedError,
    CredentialsRefusedError,
    NotSupportedError,
    RoomMismatchError,
    TransportError,
)
from cloud_sync.protocol import (
    AttendanceBatch,
    BatchResult,
    Event,
    Heartbeat,
    HeartbeatReply,
    ReleaseOffer,
    ScheduleResponse,
    ScheduleWindow,
)

if TYPE_CHECKING:
    from appliance.clock import DeviceClock

_LOGGER = logging.getLogger(__name__)

ATTENDANCE_PATH = "/api/v1/attendance"
HEARTBEAT_PATH = "/api/v1/heartbeat"
EVENTS_PATH = "/api/v1/events"
SCHEDULE_PATH = "/api/v1/schedule"
SCHEDULE_DAYS_PATH = "/api/v1/schedule/days"
STORE_KEY_PATH = "/api/v1/store-key"
STORE_KEY_BYTES = 32


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _reason(response: httpx.Response) -> str:
    """A short reason from an error body (FastAPI's {"detail": ...}) for logs and parking."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    return f"HTTP {response.status_code}: {str(detail)[:300]}"


ROOM_MISMATCH = "room_mismatch"


def _room_mismatch(response: httpx.Response) -> tuple[str, str] | None:
    """(registered room, configured room) when the aggregator's 403 says the device's key is
    valid but it is registered to another room (``code`` ``room_mismatch``), else None."""
    if response.status_code != 403:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("code") != ROOM_MISMATCH:
        return None
    return str(body.get("registered_room", "?"))[:64], str(body.get("configured_room", "?"))[:64]


def room_mismatch_text(registered: str, configured: str) -> str:
    """What the status page and the log say about a room mismatch."""
    return (f"room mismatch: the aggregator has this device registered to room {registered}, "
            f"but it is configured for {configured} (device.room_id): set device.room_id to "
            f"{registered}, or move the device to {configured} on the aggregator (console "
            "Devices > Manage > Move); its key is fine")


class HttpTransport:
    """Talks to the aggregator's REST API; raises :class:`TransportError` on anything retryable."""

    name = "http"

    def __init__(self, base_url: str, api_key: SecretStr | None, timeout_s: float,
                 clock: DeviceClock | None = None,
                 on_contact: Callable[[bool], None] | None = None) -> None:
        """``clock``: given the ``Date`` of every answer that is not a refusal, with the
        round trip (the aggregator's time, trusted while NTP has not synchronised).
        ``on_contact``: told of every answer, True when it took the device's key, False for a
        refusal (the store key keeper refreshes or deletes the wrapped key)."""
        self._clock = clock
        self._on_contact = on_contact
        headers = {"User-Agent": "classroom-attendance-appliance"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        else:
            _LOGGER.warning("sync.api_key is not set: the aggregator will refuse uploads")
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s
        )
        self.reachable = False
        self.refused: str | None = None  # "HTTP 401 ..." while the aggregator refuses the key
        # while it refuses the device's room (403 room_mismatch; ``refused`` is set too)
        self.room_mismatch: str | None = None

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        sent = time.monotonic()
        try:
            response = self._client.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as err:
            self.reachable = False
            raise TransportError(f"{method} {path}: {type(err).__name__}: {err}") from err
        received = time.monotonic()
        self.reachable = True
        status = response.status_code
        if self._clock is not None and status < 400:  # answered as this device's aggregator
            self._clock.offer_server_time(response.headers.get("date"), sent, received)
        self.refused = _reason(response) if status in (401, 403) else None
        rooms = _room_mismatch(response)
        self.room_mismatch = room_mismatch_text(*rooms) if rooms else None
        if self._on_contact is not None and (status < 400 or self.refused):
            try:  # a room mismatch took the key: not a refusal of the device
                self._on_contact(self.refused is None or rooms is not None)
            except Exception:  # the upload must go on whatever the keeper does
                _LOGGER.exception("store key keeper failed on an answer of the aggregator")
        if rooms is not None:
            # A configuration problem an operator must fix: records kept, retried slowly.
            raise RoomMismatchError(f"{method} {path}: {self.room_mismatch}", *rooms,
                                    retry_after_s=_retry_after(response))
        if status in (401, 403):
            # A key problem an operator must fix (deregistered, rotated): keep the records and
            # retry slowly; the agent wipes its cached rosters (not ours to keep any more).
            raise CredentialsRefusedError(f"{method} {path}: {_reason(response)}",
                                          _retry_after(response))
        if status == 429 or status >= 500 or status == 408:
            raise TransportError(f"{method} {path}: {_reason(response)}", _retry_after(response))
        return response

    def send_batch(self, batch: AttendanceBatch) -> BatchResult:
        response = self._request(
            "POST", ATTENDANCE_PATH, content=batch.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        if response.status_code in (400, 413, 422):
            raise BatchRefusedError(_reason(response))
        if not response.is_success:
            raise TransportError(f"POST {ATTENDANCE_PATH}: {_reason(response)}")
        try:
            return BatchResult.model_validate_json(response.content)
        except ValidationError as err:
            raise TransportError(f"POST {ATTENDANCE_PATH}: unreadable answer: {err}") from err

    def send_event(self, event: Event) -> bool:
        """True if the aggregator stored it now, False if it already had it."""
        response = self._request(
            "POST", EVENTS_PATH, content=event.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        if response.status_code in (404, 405):
            raise NotSupportedError(f"the aggregator has no {EVENTS_PATH}")
        if response.status_code in (400, 413, 422):
            raise BatchRefusedError(_reason(response))
        if not response.is_success:
            raise TransportError(f"POST {EVENTS_PATH}: {_reason(response)}")
        try:
            body = response.json()
        except ValueError:
            return True
        if isinstance(body, dict) and "duplicate" in body:
            return not bool(body["duplicate"])
        return True

    def send_heartbeat(self, heartbeat: Heartbeat) -> ReleaseOffer | None:
        """Send it; returns the release the reply names for this device (None: stay)."""
        response = self._request(
            "POST", HEARTBEAT_PATH, content=heartbeat.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        if not response.is_success:
            raise TransportError(f"POST {HEARTBEAT_PATH}: {_reason(response)}")
        try:
            reply = HeartbeatReply.model_validate_json(response.content)
        except ValueError:  # an older aggregator, or no JSON: the heartbeat is stored anyway
            return None
        return reply.release

    def fetch_store_key(self, device_id: str) -> bytes:
        """The key of this device's encrypted store (32 bytes; never logged). Raises
        :class:`CredentialsRefusedError` when the aggregator refuses the device (deregistered:
        its key is gone) and :class:`TransportError` when it cannot answer."""
        response = self._request("POST", STORE_KEY_PATH)
        if not response.is_success:
            raise TransportError(f"POST {STORE_KEY_PATH}: {_reason(response)}")
        try:
            body = response.json()
            key = base64.b64decode(body["key"], validate=True)
            owner = body["device_id"]
        except (ValueError, KeyError, TypeError, binascii.Error) as err:
            raise TransportError(f"POST {STORE_KEY_PATH}: unreadable answer") from err
        if owner != device_id or len(key) != STORE_KEY_BYTES:
            raise TransportError(f"POST {STORE_KEY_PATH}: a key for {owner!r} of {len(key)} "
                                 f"bytes, not {device_id!r}'s of {STORE_KEY_BYTES}")
        return key

    def fetch_schedule_window(
        self, room_id: str, etag: str | None, embedder: str | None, days: int
    ) -> tuple[ScheduleWindow, str | None] | None:
        """Today and the room's next ``days`` school days with their rosters, or None when
        unchanged (304). :class:`NotSupportedError` from an aggregator without the endpoint."""
        headers = {"If-None-Match": etag} if etag else {}
        params: dict[str, str | int] = {"room_id": room_id, "days": days}
        if embedder:
            params["embedder"] = embedder
        response = self._request("GET", SCHEDULE_DAYS_PATH, params=params, headers=headers)
        if response.status_code == 304:
            return None
        if response.status_code in (404, 405):
            raise NotSupportedError(f"the aggregator has no {SCHEDULE_DAYS_PATH}")
        if not response.is_success:
            raise TransportError(f"GET {SCHEDULE_DAYS_PATH}: {_reason(response)}")
        try:
            window = ScheduleWindow.model_validate_json(response.content)
        except ValidationError as err:
            raise TransportError(f"GET {SCHEDULE_DAYS_PATH}: unreadable schedule: {err}") from err
        return window, response.headers.get("ETag")

    def fetch_schedule(
        self, room_id: str, etag: str | None, embedder: str | None = None
    ) -> tuple[ScheduleResponse, str | None] | None:
        """The room's schedule and rosters (with ``embedder``'s descriptors), or None when
        unchanged (304 on If-None-Match)."""
        headers = {"If-None-Match": etag} if etag else {}
        params = {"room_id": room_id} | ({"embedder": embedder} if embedder else {})
        response = self._request("GET", SCHEDULE_PATH, params=params, headers=headers)
        if response.status_code == 304:
            return None
        if not response.is_success:
            raise TransportError(f"GET {SCHEDULE_PATH}: {_reason(response)}")
        try:
            schedule = ScheduleResponse.model_validate_json(response.content)
        except ValidationError as err:
            raise TransportError(f"GET {SCHEDULE_PATH}: unreadable schedule: {err}") from err
        return schedule, response.headers.get("ETag")
