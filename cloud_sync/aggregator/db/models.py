"""The aggregator's schema (SQLAlchemy 2 typed ORM); the same models on SQLite and PostgreSQL.

Attendance on PostgreSQL is a table partitioned by month on ``at`` (the corrected time); a
partitioned table's unique constraints must include the partition key, so the idempotency key
is made unique by the small ``attendance_keys`` table (key as primary key) that every insert goes
through first. On SQLite ``attendance.key`` carries a unique index instead. See
``db/partitions.py`` and the first migration.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    Time,
    Uuid,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from cloud_sync.protocol import LEGACY_EMBEDDER

ID_LEN = 64
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out on every backend (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Student(Base):
    __tablename__ = "students"
    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(254), default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    consent: Mapped[str | None] = mapped_column(
        String(16), default=None,
        doc="granted | withdrawn | None (never recorded): only 'granted' allows face data")
    consent_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    consent_by: Mapped[str | None] = mapped_column(
        String(200), default=None, doc="who recorded the consent state (token, user, CLI)")


class Course(Base):
    __tablename__ = "courses"
    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Enrollment(Base):
    __tablename__ = "enrollments"
    student_id: Mapped[str] = mapped_column(
        ForeignKey("students.id", ondelete="CASCADE"), primary_key=True
    )
    course_id: Mapped[str] = mapped_column(
        ForeignKey("courses.id", ondelete="CASCADE"), primary_key=True
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    __table_args__ = (Index("ix_enrollments_course", "course_id", "student_id"),)


class Room(Base):
    __tablename__ = "rooms"
    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    site: Mapped[str] = mapped_column(String(ID_LEN))
    timezone: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Schedule(Base):
    """A weekly slot: course in room on weekday (0 = Monday) from start to end, local time."""

    __tablename__ = "schedules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    course_id: Mapped[str] = mapped_column(ForeignKey("courses.id", ondelete="CASCADE"))
    room_id: Mapped[str] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"))
    weekday: Mapped[int] = mapped_column(SmallInteger)
    start_time: Mapped[time] = mapped_column(Time)
    end_time: Mapped[time] = mapped_column(Time)
    effective_from: Mapped[date | None] = mapped_column(Date, default=None)
    effective_to: Mapped[date | None] = mapped_column(Date, default=None)
    __table_args__ = (
        Index("ix_schedules_room_weekday", "room_id", "weekday"),
        Index("ix_schedules_course", "course_id"),
    )


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    room_id: Mapped[str] = mapped_column(ForeignKey("rooms.id"))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    software_version: Mapped[str | None] = mapped_column(String(64), default=None)
    clock_offset_s: Mapped[float | None] = mapped_column(
        Float, default=None, doc="server receive time - device send time, last heartbeat"
    )
    store_key: Mapped[bytes | None] = mapped_column(
        LargeBinary, default=None,
        doc="the key of the device's encrypted store (32 random bytes, made at its first "
        "request; deleted with the device, which makes a stolen card's copy unreadable)")
    refused_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), default=None,
        doc="the last contact refused although the key was valid (issue 25 item 8)")
    refused_reason: Mapped[str | None] = mapped_column(
        String(32), default=None, doc="why: room_mismatch")
    refused_room: Mapped[str | None] = mapped_column(
        String(ID_LEN), default=None, doc="the room the device said it was in")


class FaceEmbedding(Base):
    __tablename__ = "face_embeddings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    student_id: Mapped[str] = mapped_column(ForeignKey("students.id", ondelete="CASCADE"))
    vector: Mapped[bytes] = mapped_column(LargeBinary, doc="128 little-endian float32")
    embedder: Mapped[str] = mapped_column(
        String(100), server_default=LEGACY_EMBEDDER,
        doc="`name/model_version` that made the vector (rows before 0004: dlib)")
    photo_of: Mapped[int | None] = mapped_column(
        ForeignKey("face_embeddings.id", ondelete="CASCADE"), default=None,
        doc="None: the row stands for its photo; else the id of the row that does (the same "
        "photo's descriptor by another embedder)")
    source: Mapped[str] = mapped_column(String(200))
    quality: Mapped[float | None] = mapped_column(Float, default=None)
    photo_path: Mapped[str | None] = mapped_column(String(500), default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    __table_args__ = (Index("ix_face_embeddings_student", "student_id"),
                      Index("ix_face_embeddings_photo_of", "photo_of"))


class Attendance(Base):
    """One accepted record. ``at`` is the time the record counts at (corrected when the
    device clock was not synchronised); ``seen_at`` is what the device said."""

    __tablename__ = "attendance"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[uuid.UUID] = mapped_column(Uuid)
    student_id: Mapped[str] = mapped_column(ForeignKey("students.id"))
    course_id: Mapped[str | None] = mapped_column(ForeignKey("courses.id"), default=None)
    device_course_id: Mapped[str | None] = mapped_column(String(ID_LEN), default=None)
    room_id: Mapped[str] = mapped_column(ForeignKey("rooms.id"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    confidence: Mapped[float] = mapped_column(Float)
    distance: Mapped[float | None] = mapped_column(Float, default=None)
    clock_synced: Mapped[bool] = mapped_column(Boolean)
    boot_id: Mapped[str | None] = mapped_column(String(64), default=None)
    monotonic_s: Mapped[float | None] = mapped_column(Float, default=None)
    time_uncertain: Mapped[bool] = mapped_column(Boolean, default=False)
    correction: Mapped[str] = mapped_column(
        String(16), doc="none | heartbeat_sync | heartbeat_offset | uncertain"
    )
    __table_args__ = (
        # SQLite: unique index on key (migrations); PostgreSQL: attendance_keys instead.
        Index("ix_attendance_student_at", "student_id", "at"),
        Index("ix_attendance_course_at", "course_id", "at"),
        Index("ix_attendance_room_at", "room_id", "at"),
        Index(
            "ix_attendance_unsynced", "device_id", "boot_id",
            postgresql_where=text("clock_synced = false"), sqlite_where=text("clock_synced = 0"),
        ),
    )


class AttendanceKey(Base):
    """PostgreSQL only: the global uniqueness of attendance keys across partitions."""

    __tablename__ = "attendance_keys"
    key: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)


class Heartbeat(Base):
    __tablename__ = "heartbeats"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    sent_at: Mapped[datetime] = mapped_column(UtcDateTime())
    clock_synced: Mapped[bool] = mapped_column(Boolean)
    boot_id: Mapped[str | None] = mapped_column(String(64), default=None)
    monotonic_s: Mapped[float | None] = mapped_column(Float, default=None)
    software_version: Mapped[str] = mapped_column(String(64))
    uptime_s: Mapped[float] = mapped_column(Float)
    cpu_temp_c: Mapped[float | None] = mapped_column(Float, default=None)
    outbox_depth: Mapped[int] = mapped_column(Integer)
    oldest_unsent_age_s: Mapped[float | None] = mapped_column(Float, default=None)
    last_frame_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    fps: Mapped[float | None] = mapped_column(Float, default=None)
    placement: Mapped[str | None] = mapped_column(
        Text, default=None, doc="the device's placement check (protocol.PlacementReport, JSON)")
    store_unlock: Mapped[str | None] = mapped_column(
        Text, default=None,
        doc="how the device's store was opened (protocol.StoreUnlockReport, JSON)")
    __table_args__ = (
        Index("ix_heartbeats_device_boot", "device_id", "boot_id", "clock_synced"),
        Index("ix_heartbeats_device_received", "device_id", "received_at"),
    )


class EventRow(Base):
    __tablename__ = "events"
    key: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    room_id: Mapped[str] = mapped_column(String(ID_LEN))
    kind: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(String(500))
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    session_id: Mapped[str | None] = mapped_column(String(100), default=None)
    v: Mapped[int] = mapped_column(SmallInteger, default=1, server_default="1")
    __table_args__ = (
        Index("ix_events_device_at", "device_id", "at"),
        Index("ix_events_room_session_kind", "room_id", "session_id", "kind", "at"),
        Index("ix_events_at", "at"),
    )


class AdminToken(Base):
    __tablename__ = "admin_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)


class DeadLetter(Base):
    """A message that could not be processed (e.g. a malformed MQTT payload): kept, not lost."""

    __tablename__ = "dead_letters"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(200), doc="e.g. an MQTT topic")
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    __table_args__ = (Index("ix_dead_letters_received", "received_at"),)


class AuditLog(Base):
    """Append-only: who viewed, exported, corrected, erased or purged what (no contents, no
    face data). Rows are only ever inserted, and deleted by retention (``audit_keep_days``)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(
        String(200), doc="token:<name>, console:<user>, cli:<user>, system")
    action: Mapped[str] = mapped_column(String(64), doc="e.g. student.view, student.erase")
    subject: Mapped[str] = mapped_column(String(200), doc="e.g. student:S001")
    detail: Mapped[str] = mapped_column(String(1000), default="")
    __table_args__ = (Index("ix_audit_log_at", "at"), Index("ix_audit_log_subject", "subject"))


# ---- web console (cloud_sync/aggregator/console/) -------------------------------------------


class ConsoleUser(Base):
    """A person who logs in to the console: ``admin`` (everything) or ``teacher`` (the courses
    of ``course_teachers`` only). The password is stored as an Argon2id hash."""

    __tablename__ = "console_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(16), doc="admin | teacher")
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class CourseTeacher(Base):
    __tablename__ = "course_teachers"
    user_id: Mapped[int] = mapped_column(
        ForeignKey("console_users.id", ondelete="CASCADE"), primary_key=True
    )
    course_id: Mapped[str] = mapped_column(
        ForeignKey("courses.id", ondelete="CASCADE"), primary_key=True
    )


class ConsoleSession(Base):
    """A server-side login session: the cookie holds a random token, the table its sha256;
    logout (or an expiry) deletes the row, which ends the session everywhere at once."""

    __tablename__ = "console_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("console_users.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    __table_args__ = (Index("ix_console_sessions_user", "user_id"),)


class AttendanceCorrection(Base):
    """A person's correction of attendance, kept as an audit trail (rows are never deleted;
    an undo only stamps ``undone_at``/``undone_by``, and the audit log has each step).

    ``present``: the student counts as seen in ``course_id`` at ``at`` (marked by hand);
    ``absent``: the student was absent from the class of ``course_id`` starting at ``at``, which
    had no data for them (marked by hand from the register; a sighting still wins);
    ``not_student``: the record ``attendance_key`` was a wrong recognition: it and every record
    of the student for the course in ``[span_from, span_to)`` (the class meeting, early arrival
    included; NULL span: that record alone, corrections from before issue 25) no longer count.
    An undone correction counts for nothing. Reports (API, CSV and console) read attendance
    through these corrections."""

    __tablename__ = "attendance_corrections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), doc="present | absent | not_student")
    student_id: Mapped[str] = mapped_column(ForeignKey("students.id", ondelete="CASCADE"))
    course_id: Mapped[str | None] = mapped_column(
        ForeignKey("courses.id", ondelete="CASCADE"), default=None
    )
    attendance_key: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    reason: Mapped[str] = mapped_column(String(500))
    by_user: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    span_from: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), default=None, doc="not_student: the struck class meeting's start "
        "(minus early arrival); NULL: the one record")
    span_to: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), default=None, doc="not_student: the struck class meeting's end")
    undone_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    undone_by: Mapped[str | None] = mapped_column(String(100), default=None)
    __table_args__ = (
        Index("ix_corrections_course_at", "course_id", "at"),
        Index("ix_corrections_student", "student_id", "at"),
        Index("ix_corrections_key", "attendance_key"),
    )


class FaceNegative(Base):
    """A descriptor that is NOT this student (a recognition marked wrong). Rosters carry the
    ``confirmed`` ones as ``negatives`` so a device can refuse the same face for that student;
    a ``pending`` one waits for the course's teacher (or an admin) to confirm it on the page
    that shows what it would turn away. Undoing the correction deletes its negatives."""

    __tablename__ = "face_negatives"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    student_id: Mapped[str] = mapped_column(ForeignKey("students.id", ondelete="CASCADE"))
    vector: Mapped[bytes] = mapped_column(LargeBinary, doc="little-endian float32")
    embedder: Mapped[str] = mapped_column(String(100), doc="`name/model_version` of the vector")
    source: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    state: Mapped[str] = mapped_column(String(16), default="pending",
                                       doc="pending | confirmed (only these reach rosters)")
    correction_id: Mapped[int | None] = mapped_column(
        ForeignKey("attendance_corrections.id", ondelete="CASCADE"), default=None)
    confirmed_by: Mapped[str | None] = mapped_column(String(100), default=None)
    confirmed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    __table_args__ = (Index("ix_face_negatives_student", "student_id"),
                      Index("ix_face_negatives_correction", "correction_id"))


class RecordDescriptor(Base):
    """The face descriptor a device matched for one attendance record (optional on the wire):
    what a "not this student" correction turns into a negative example."""

    __tablename__ = "record_descriptors"
    key: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary, doc="little-endian float32")
    embedder: Mapped[str] = mapped_column(String(100), doc="`name/model_version` of the vector")
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())


class UnknownFace(Base):
    """A face a device could not recognise (only when unknown-face reporting is switched on):
    a small JPEG crop and its descriptor, until an admin labels or dismisses it or it expires
    (``unknown_face_keep_hours``)."""

    __tablename__ = "unknown_faces"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    room_id: Mapped[str] = mapped_column(String(ID_LEN))
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    vector: Mapped[bytes] = mapped_column(LargeBinary, doc="little-endian float32")
    embedder: Mapped[str] = mapped_column(String(100), doc="`name/model_version` of the vector")
    crop: Mapped[bytes] = mapped_column(LargeBinary, doc="JPEG")
    __table_args__ = (Index("ix_unknown_faces_received", "received_at"),)


# ---- recorded sessions (services/recordings.py, services/recording_job.py) ------------------


class Recording(Base):
    """An uploaded session recording: a room's class at a date and time, processed by a job
    with the device's own pipeline. The file goes after ``recording_keep_days``
    (``file_deleted_at``); the row and ``result`` (what the job derived) stay."""

    __tablename__ = "recordings"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    room_id: Mapped[str] = mapped_column(ForeignKey("rooms.id"))
    course_id: Mapped[str] = mapped_column(ForeignKey("courses.id", ondelete="CASCADE"))
    starts_at: Mapped[datetime] = mapped_column(UtcDateTime(), doc="wall time of the first frame")
    instructor_id: Mapped[str | None] = mapped_column(
        ForeignKey("students.id", ondelete="SET NULL"), default=None,
        doc="the instructor, enrolled like a student: whose presence the job tracks")
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigId)
    received_bytes: Mapped[int] = mapped_column(BigId, default=0)
    state: Mapped[str] = mapped_column(
        String(16), doc="uploading | checking | ready | rejected (the check refused it)")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    duration_s: Mapped[float | None] = mapped_column(Float, default=None)
    width: Mapped[int | None] = mapped_column(Integer, default=None)
    height: Mapped[int | None] = mapped_column(Integer, default=None)
    fps: Mapped[float | None] = mapped_column(Float, default=None)
    video_codec: Mapped[str | None] = mapped_column(String(32), default=None)
    playback: Mapped[str] = mapped_column(
        String(16), default="none", doc="none | ready | failed: the browser copy (H.264/AAC)")
    uploaded_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    file_deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, default=None, doc="the last completed job's results (attendance counts, "
        "instructor presence, events)")
    __table_args__ = (Index("ix_recordings_course_start", "course_id", "starts_at"),
                      Index("ix_recordings_created", "created_at"))


class RecordingJob(Base):
    """A processing job of a recording. The database row is the job's truth whichever queue
    delivers it (this database, or Redis with RQ): a worker claims it by a conditional update
    (queued -> running), so no job runs twice; a running job whose ``heartbeat_at`` is older
    than ``job_lease_s`` is failed ("worker stopped") and can be retried."""

    __tablename__ = "recording_jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    recording_id: Mapped[str] = mapped_column(ForeignKey("recordings.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(
        String(16), doc="queued | running | completed | failed | cancelled")
    phase: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(Float, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    __table_args__ = (Index("ix_recording_jobs_status", "status", "created_at"),
                      Index("ix_recording_jobs_recording", "recording_id"))


class JobWorker(Base):
    """A running ``aggregator worker`` (database queue): it writes ``seen_at`` every poll and
    removes its row when it stops. The recordings pages say when none is alive (jobs would
    wait "queued" forever)."""

    __tablename__ = "job_workers"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ReleaseKey(Base):
    """A public key releases must be signed with (``aggregator releases trust``); the private
    key never comes here."""

    __tablename__ = "release_keys"
    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    public_pem: Mapped[str] = mapped_column(Text)
    added_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Release(Base):
    """A verified, signed bundle (``aggregator releases add``): its manifest and signature as
    signed; its files are kept by sha256 under data_dir/releases/files."""

    __tablename__ = "releases"
    version: Mapped[str] = mapped_column(String(ID_LEN), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16))
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    files: Mapped[int] = mapped_column(Integer)
    total_bytes: Mapped[int] = mapped_column(BigInteger)
    added_at: Mapped[datetime] = mapped_column(UtcDateTime())
    added_by: Mapped[str] = mapped_column(String(200))


class Rollout(Base):
    """A release on its way to the fleet: canary room, then a share, then all; halted by a
    revert or a refusal anywhere. At most one rollout is active (a new one supersedes it)."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(ForeignKey("releases.version", ondelete="CASCADE"))
    canary_room: Mapped[str] = mapped_column(String(ID_LEN))
    share_pct: Mapped[int] = mapped_column(SmallInteger)
    stage: Mapped[str] = mapped_column(String(16), doc="canary | share | all | done")
    during_class: Mapped[bool] = mapped_column(Boolean, default=False)
    max_bytes_per_s: Mapped[int | None] = mapped_column(Integer, default=None)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    stage_at: Mapped[datetime] = mapped_column(UtcDateTime())
    started_by: Mapped[str] = mapped_column(String(200))
    halted_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    halted_reason: Mapped[str | None] = mapped_column(String(700), default=None)
    __table_args__ = (Index("ix_rollouts_active", "active"),)


class DeviceUpdate(Base):
    """What a device's updater reported (protocol.UpdateReport): its update history."""

    __tablename__ = "device_updates"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[str | None] = mapped_column(String(ID_LEN), default=None)
    running: Mapped[str | None] = mapped_column(String(ID_LEN), default=None)
    reason: Mapped[str | None] = mapped_column(String(500), default=None)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    __table_args__ = (Index("ix_device_updates_device_at", "device_id", "at"),
                      Index("ix_device_updates_version_state", "version", "state"))
