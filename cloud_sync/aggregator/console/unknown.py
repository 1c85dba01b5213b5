"""Unknown faces (walk-in enrolment), off unless ``unknown_faces_enabled``.

Devices post a small crop and the descriptor of each track they could not recognise
(``POST /api/v1/unknown-faces``). The console groups them by likely person (descriptors within
``unknown_group_distance`` of each other, chained: single-linkage), and an admin labels a group
as a student (its descriptors are enrolled as the student's face data, the crops deleted) or
dismisses it (deleted). Whatever is left is deleted ``unknown_face_keep_hours`` after arrival.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

import numpy as np
from fastapi import APIRouter, BackgroundTasks, Form, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cloud_sync.aggregator.api import deps
from cloud_sync.aggregator.api.admin import _after_write as after_write
from cloud_sync.aggregator.console.accounts import audit
from cloud_sync.aggregator.console.web import (
    DB,
    PostUser,
    User,
    back,
    context,
    render,
    require_admin,
)
from cloud_sync.aggregator.db.models import FaceEmbedding, Student, UnknownFace
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import faces, privacy
from cloud_sync.aggregator.services.common import (
    ForbiddenError,
    NotFoundError,
    ServiceError,
    utcnow,
)
from cloud_sync.protocol import EMBEDDING_DIM, UnknownFaceReport

_LOGGER = logging.getLogger(__name__)
api_router = APIRouter(prefix="/api/v1", tags=["device"])
router = APIRouter(include_in_schema=False)
MAX_CROP_SIDE = 256
MAX_SHOWN = 500  # newest faces grouped on the page


def _crop_bytes(text: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServiceError("crop_jpeg is not base64") from err
    try:  # the header's size first: a tiny file can declare a huge image (services/faces.py)
        faces.decode_image(data, max_side=MAX_CROP_SIDE)
    except ServiceError as err:
        raise ServiceError(f"crop_jpeg: {err.message}") from err
    return data


@api_router.post("/unknown-faces", summary="A device's unrecognised face (crop + descriptor); "
                 "403 unless the aggregator's unknown_faces_enabled is on.")
def report_unknown(request: Request, who: deps.Device, session: deps.DB,
                   body: UnknownFaceReport) -> dict[str, bool]:
    ctx = deps.context(request)
    if not ctx.settings.unknown_faces_enabled:
        raise ForbiddenError("unknown faces are not accepted (unknown_faces_enabled is off)")
    if body.device_id != who.device_id or body.room_id != who.room_id:
        raise ForbiddenError("device_id / room_id are not the authenticated device's")
    crop = _crop_bytes(body.crop_jpeg)
    values = {"key": body.key, "device_id": who.device_id, "room_id": who.room_id,
              "at": body.at, "received_at": utcnow(), "crop": crop,
              "embedder": body.embedder,
              "vector": np.asarray(body.descriptor, dtype="<f4").tobytes()}
    begin_write(session)
    table = UnknownFace.__table__
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stored = session.execute(
        insert(table).values(values).on_conflict_do_nothing().returning(table.c.id)
    ).first() is not None
    session.commit()
    return {"stored": stored, "duplicate": not stored}


@dataclass
class Group:
    faces: list[UnknownFace]

    @property
    def first(self) -> datetime:
        return min(f.at for f in self.faces)

    @property
    def last(self) -> datetime:
        return max(f.at for f in self.faces)

    @property
    def rooms(self) -> list[str]:
        return sorted({f.room_id for f in self.faces})

    @property
    def ids(self) -> list[int]:
        return [f.id for f in self.faces]


def group_faces(rows: list[UnknownFace], max_distance: float) -> list[Group]:
    """Single-linkage groups: faces chained by descriptor distances <= ``max_distance``;
    largest group first."""
    if not rows:
        return []
    vectors = np.stack([np.frombuffer(r.vector, dtype="<f4").astype(np.float64)
                        for r in rows]).reshape(-1, EMBEDDING_DIM)
    sq = (vectors ** 2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * vectors @ vectors.T, 0.0))
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(dist <= max_distance, k=1)), strict=True):
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[UnknownFace]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(root(i), []).append(row)
    return sorted((Group(g) for g in groups.values()), key=lambda g: (-len(g.faces), g.first))


def _selected(session: Session, ids: list[int]) -> list[UnknownFace]:
    if not ids or len(ids) > MAX_SHOWN:
        raise ServiceError("choose a group of faces")
    rows = list(session.scalars(select(UnknownFace).where(UnknownFace.id.in_(ids))))
    if not rows:
        raise NotFoundError("these faces are gone (labelled, dismissed or expired)")
    return rows


@router.get("/unknown", response_class=HTMLResponse)
def unknown_page(request: Request, who: User, session: DB) -> Response:
    require_admin(who)
    settings = context(request).settings
    rows = list(session.scalars(
        select(UnknownFace).order_by(UnknownFace.id.desc()).limit(MAX_SHOWN)))
    groups = group_faces(rows, settings.unknown_group_distance)
    students = list(session.scalars(select(Student).order_by(Student.id).limit(2000)))
    return render(request, "unknown.html", who, groups=groups, students=students,
                  enabled=settings.unknown_faces_enabled)


@router.get("/unknown/{face_id}.jpg")
def unknown_crop(who: User, session: DB, face_id: int) -> Response:
    require_admin(who)
    row = session.get(UnknownFace, face_id)
    if row is None:
        raise NotFoundError("no such face (labelled, dismissed or expired)")
    return Response(row.crop, media_type="image/jpeg", headers={"Cache-Control": "private"})


def find_student(session: Session, text: str) -> Student:
    """The student the picker names: an id, ``"S001 · Ada Lovelace"`` (the list's own
    entries), or a name that only one student has. Never a default: nothing typed, nobody."""
    text = text.strip()
    if not text:
        raise ServiceError("type the student's name or id and pick them in the list")
    student = session.get(Student, text.split(" · ", 1)[0].strip())
    if student is not None:
        return student
    named = list(session.scalars(select(Student).where(
        func.lower(Student.name) == text.lower()).limit(3)))
    if len(named) == 1:
        return named[0]
    if named:
        raise ServiceError(f"several students are called {text!r}: pick one by id in the list")
    raise NotFoundError(f"no student {text!r}: pick one in the list")


@router.post("/unknown/label")
def label(request: Request, tasks: BackgroundTasks, who: PostUser, session: DB,
          face_ids: Annotated[list[int], Form()],
          student: Annotated[str, Form(max_length=300)] = "",
          student_id: Annotated[str, Form(max_length=64)] = "",
          confirm: Annotated[str, Form(max_length=10)] = "") -> Response:
    """Two steps: the picked student and the group first come back as a confirmation page
    (the crops beside the student's name, consent and photos); only its "yes" (``confirm``)
    enrols the group's descriptors as the student's face data, and deletes the crops."""
    require_admin(who)
    ctx = context(request)
    rows = _selected(session, face_ids)
    found = find_student(session, student_id or student)
    privacy.require_consent(session, found.id)  # 409 without consent
    if confirm != "yes":
        photos = session.scalar(select(func.count()).where(
            FaceEmbedding.student_id == found.id, FaceEmbedding.photo_of.is_(None)))
        return render(request, "unknown_confirm.html", who, student=found, faces=rows,
                      photos=photos)
    vectors = [(r.id, r.embedder, np.frombuffer(r.vector, dtype="<f4").copy()) for r in rows]
    name = found.name
    session.rollback()
    for face_id, embedder, vector in vectors:
        faces.store_embedding(session, ctx.settings, found.id, {embedder: vector}, None,
                              f"walk-in:{face_id}")
    begin_write(session)
    session.execute(delete(UnknownFace).where(UnknownFace.id.in_([v[0] for v in vectors])))
    audit(session, who.name, "unknown.label", f"student:{found.id}",
          f"{len(vectors)} faces enrolled")
    session.commit()
    after_write(ctx, tasks, "students")
    return back("/unknown", f"{len(vectors)} faces enrolled as {name} ({found.id})")


@router.post("/unknown/dismiss")
def dismiss(who: PostUser, session: DB, face_ids: Annotated[list[int], Form()]) -> Response:
    require_admin(who)
    rows = _selected(session, face_ids)
    begin_write(session)
    session.execute(delete(UnknownFace).where(UnknownFace.id.in_([r.id for r in rows])))
    audit(session, who.name, "unknown.dismiss", "unknown-faces", f"{len(rows)} faces")
    session.commit()
    return back("/unknown", f"{len(rows)} faces dismissed and deleted")
