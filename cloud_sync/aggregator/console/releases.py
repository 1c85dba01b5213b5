"""The Devices page's release forms (admin): add a signed release from an uploaded archive,
start a rollout. Both call the services the CLI and the API call (services/releases.py).

The upload (``POST /releases/add``, multipart: ``csrf`` then the ``bundle`` file) is streamed
to a file under ``data_dir/releases/incoming``, never held in memory: the form's fields are
parsed as they arrive (python-multipart's streaming parser), the CSRF token must come before
the file (the page's form puts it first), and the file stops at ``release_upload_max_bytes``
(the Content-Length announced is checked before one byte is read). The archive is then
unpacked with ``release_archive``'s checks and verified by ``add_release`` exactly as
``aggregator releases add`` does; the upload and the unpacked copy are removed in every case.
"""

from __future__ import annotations

import hmac
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.console import devices
from cloud_sync.aggregator.console.accounts import ConsolePrincipal
from cloud_sync.aggregator.console.web import (
    DB,
    PostUser,
    User,
    back,
    context,
    require_admin,
    same_origin,
)
from cloud_sync.aggregator.db.models import Release, Room
from cloud_sync.aggregator.services import releases as release_svc
from cloud_sync.aggregator.services.common import NotFoundError, ServiceError

router = APIRouter(include_in_schema=False)
ADD_ROUTE = "/releases/add"
FIELD_BYTES = 4096  # the csrf token (and nothing else but the file) is small
MAX_FIELDS = 8
# the archive, the unpacked bundle, the stored files: free space wanted before an upload
SPACE_FACTOR = 3


class UploadRefused(Exception):  # noqa: N818 (the upload's own outcome, shown on the page)
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Receiver:
    """python-multipart's callbacks: small fields kept, the one file part's bytes queued
    for the file (written between two reads, off the event loop)."""

    def __init__(self, csrf_token: str, max_bytes: int) -> None:
        self.csrf_token = csrf_token
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self.pending: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._name = self._value = b""
        self._field: str | None = None
        self._data = bytearray()
        self._in_file = False

    def csrf_ok(self) -> bool:
        token = self.fields.get("csrf", "")
        return bool(token) and hmac.compare_digest(token.encode(), self.csrf_token.encode())

    def on_part_begin(self) -> None:
        self._headers, self._field, self._data, self._in_file = {}, None, bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name = self._value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._field = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.fields) >= MAX_FIELDS:
                raise UploadRefused(400, "too many form fields")
            return
        if self._field != "bundle" or self.filename is not None:
            raise UploadRefused(400, "one file only, in the field 'bundle'")
        if not self.csrf_ok():  # before one byte of the file is kept
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
        self.filename = options[b"filename"].decode("utf-8", "replace")
        self._in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.file_bytes += end - start
            if self.file_bytes > self.max_bytes:
                raise UploadRefused(413, too_large(self.max_bytes))
            self.pending.append(data[start:end])
            return
        self._data += data[start:end]
        if len(self._data) > FIELD_BYTES:
            raise UploadRefused(400, f"the form field {self._field!r} is too long")

    def on_part_end(self) -> None:
        if not self._in_file and self._field:
            self.fields[self._field] = self._data.decode("utf-8", "replace")
        self._in_file = False

    def callbacks(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_part_data", "on_part_end", "on_header_field",
            "on_header_value", "on_header_end", "on_headers_finished")}


def too_large(max_bytes: int) -> str:
    return (f"the archive is larger than {max_bytes / 1e6:,.0f} MB, the most this aggregator "
            "takes (setting release_upload_max_bytes): nothing was stored")


def _boundary(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadRefused(400, "send the form as multipart/form-data (the page's form does)")
    return options[b"boundary"]


def _check_space(settings: AggregatorSettings, incoming: Path, announced: int) -> None:
    free = shutil.disk_usage(incoming).free
    if announced and free < SPACE_FACTOR * announced:
        raise UploadRefused(507, f"not enough free disk space on the aggregator for this "
                            f"release: {free / 1e6:,.0f} MB free under {settings.data_dir}, "
                            f"about {SPACE_FACTOR * announced / 1e6:,.0f} MB needed "
                            "(the upload, its unpacked copy, the stored files)")


async def receive_archive(request: Request, who: ConsolePrincipal, target: Path) -> str:
    """The request's ``bundle`` file streamed into ``target``; returns its file name."""
    settings = context(request).settings
    limit = settings.release_upload_max_bytes
    try:
        announced = int(request.headers.get("content-length", "0"))
    except ValueError:
        announced = 0
    from cloud_sync.aggregator.app import MULTIPART_OVERHEAD

    if announced > limit + MULTIPART_OVERHEAD:
        raise UploadRefused(413, too_large(limit))
    _check_space(settings, target.parent, announced)
    receiver = _Receiver(who.csrf_token, limit)
    parser = MultipartParser(_boundary(request), receiver.callbacks())  # type: ignore[arg-type]
    received = 0
    with target.open("wb") as out:
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit + MULTIPART_OVERHEAD:  # whatever the parts are
                    raise UploadRefused(413, too_large(limit))
                if chunk:
                    parser.write(chunk)
                if receiver.pending:
                    data, receiver.pending = b"".join(receiver.pending), []
                    await run_in_threadpool(out.write, data)
            parser.finalize()
        except MultipartParseError as err:
            raise UploadRefused(400, f"the form could not be read ({err})") from err
        except ClientDisconnect as err:
            raise UploadRefused(400, "the upload was interrupted: nothing was stored") from err
    if not receiver.filename:  # no file part, or no file chosen
        if not receiver.csrf_ok():
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")
        raise UploadRefused(422, "choose the release's .tar or .tar.gz file first")
    if receiver.file_bytes == 0:
        raise UploadRefused(422, f"{receiver.filename}: an empty file")
    return receiver.filename


@router.post(ADD_ROUTE)
async def add_release(request: Request, who: User) -> Response:
    """Add a signed release from an uploaded .tar/.tar.gz of its bundle directory."""
    require_admin(who)
    if not same_origin(request):
        raise HTTPException(403, "cross-site request refused")
    ctx = context(request)
    incoming = release_svc.incoming_dir(ctx.settings)
    incoming.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=incoming)
    os.close(handle)
    archive = Path(name)
    actor = f"console:{who.name}"

    def work() -> Release:
        with ctx.sessions() as session:
            return release_svc.add_release_archive(session, ctx.settings, archive, actor)

    try:
        filename = await receive_archive(request, who, archive)
        row = await run_in_threadpool(work)
        return back("/devices", f"release {row.version} added from {filename}: {row.files} "
                                f"files, {row.total_bytes / 1e6:.1f} MB, signed by key "
                                f"{row.key_id}")
    except UploadRefused as err:
        return await _refused(request, who, err.status, err.message)
    except ServiceError as err:
        return await _refused(request, who, err.status, f"{err.message}. Nothing was stored.")
    finally:
        archive.unlink(missing_ok=True)


async def _refused(request: Request, who: ConsolePrincipal, status: int,
                   message: str) -> Response:
    ctx = context(request)

    def render() -> Response:
        with ctx.sessions() as session:
            return devices.page(request, who, session, status=status,
                                add_errors={"bundle": message})

    return await run_in_threadpool(render)


# -- start a rollout --------------------------------------------------------------------------

KB = 1000


@router.post("/releases/rollout")
def start_rollout(request: Request, who: PostUser, session: DB,
                  version: Annotated[str, Form(max_length=64)] = "",
                  canary_room: Annotated[str, Form(max_length=64)] = "",
                  share_pct: Annotated[str, Form(max_length=10)] = "25",
                  during_class: Annotated[str, Form(max_length=10)] = "no",
                  max_kb_per_s: Annotated[str, Form(max_length=20)] = "") -> Response:
    """Start rolling a held release out: as ``POST /api/v1/releases/rollout`` (same service,
    same bounds); a refusal shows the form again with the input and the reason beside the
    field."""
    require_admin(who)
    form = {"version": version, "canary_room": canary_room, "share_pct": share_pct,
            "during_class": during_class, "max_kb_per_s": max_kb_per_s}
    errors: dict[str, str] = {}
    if session.get(Release, version) is None:
        errors["version"] = ("choose a release in the list" if not version else
                             f"there is no release {version!r}: add it first")
    if session.get(Room, canary_room) is None:
        errors["canary_room"] = ("choose the canary room" if not canary_room else
                                 f"there is no room {canary_room!r}")
    share = _whole(share_pct.strip(), 0, 100, errors, "share_pct", "a share from 0 to 100 %")
    cap = None
    if max_kb_per_s.strip():
        cap = _whole(max_kb_per_s.strip(), 10, 1_000_000, errors, "max_kb_per_s",
                     "a cap from 10 to 1,000,000 KB/s, or empty for none")
    if during_class not in ("yes", "no"):
        errors["during_class"] = "yes or no"
    if not errors:
        try:
            row = release_svc.start_rollout(
                session, version, canary_room, share or 0, f"console:{who.name}",
                during_class=during_class == "yes",
                max_bytes_per_s=None if cap is None else cap * KB)
        except NotFoundError as err:
            errors["version"] = err.message
        except ServiceError as err:
            field = "canary_room" if "canary room" in err.message else "version"
            errors[field] = err.message
    if errors:
        session.rollback()
        return devices.page(request, who, session, status=422, rollout_form=form,
                            rollout_errors=errors)
    cache = context(request).extra.get("release_snapshot")
    if cache is not None:
        cache.clear()
    return back("/devices", f"rollout of {row.version} started: canary room "
                            f"{row.canary_room} first, then {row.share_pct}% of the fleet, "
                            "then all")


def _whole(text: str, low: int, high: int, errors: dict[str, str], field: str,
           wanted: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        errors[field] = f"{text!r} is not a whole number: {wanted}"
        return None
    if not low <= value <= high:
        errors[field] = f"{value} is out of range: {wanted}"
        return None
    return value
