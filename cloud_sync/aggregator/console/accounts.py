"""Console accounts: users with Argon2id password hashes, server-side sessions, login limits.

- ``aggregator users add NAME --role admin|teacher`` creates a user; the password is typed (or
  read from stdin), never defaulted. Hashes: argon2-cffi's PasswordHasher (Argon2id, salted).
- A login creates a ``console_sessions`` row keyed by the sha256 of a random 256-bit cookie
  token, with its own CSRF token; logout deletes the row, so a copied cookie stops working.
- :class:`LoginLimits` counts ATTEMPTS, not failures, per user name and per client address, on
  the shared rate limiter (every API process counts together): a slot is taken before the
  password is checked, so N parallel guesses cannot all slip in between a check and the
  recording of their failures.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cloud_sync.aggregator.api.limiter import Limiter
from cloud_sync.aggregator.db.models import (
    ConsoleSession,
    ConsoleUser,
    Course,
    CourseTeacher,
)
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import audit as audit_log
from cloud_sync.aggregator.services.common import (
    ConflictError,
    NotFoundError,
    ServiceError,
    utcnow,
)

_LOGGER = logging.getLogger(__name__)
ROLES = ("admin", "teacher")
MIN_PASSWORD_LENGTH = 10
_HASHER = PasswordHasher()  # Argon2id, RFC 9106 low-memory profile (64 MiB, t=3)
# A hash to verify against when the user does not exist: same cost, so timing does not tell
# which names exist.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))
# Each check holds 64 MiB while it runs: at most this many at once, whatever the request load
# (guesses spread over many names and addresses must not exhaust the memory).
_CHECKS = threading.BoundedSemaphore(4)


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ServiceError(f"the password needs at least {MIN_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def verify_password(password: str, stored: str) -> bool:
    try:
        with _CHECKS:
            return _HASHER.verify(stored, password)
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError):
        _LOGGER.error("a stored console password hash is malformed")
        return False


def actor(user: str) -> str:
    """The audit log's actor of a console user (``console:<name>``); ``cli:<os user>`` as is."""
    return user if user.startswith("cli:") else f"console:{user}"


def audit(session: Session, user: str, action: str, subject: str, detail: str = "") -> None:
    """Add an entry to the one audit log (services/audit.py, ``audit_log``) in the session's
    transaction (the caller commits): ``user`` is the console user's name (or a
    ``cli:<os user>`` actor), ``subject`` a typed id such as ``student:S001``."""
    audit_log.record(session, actor(user), action, subject, detail)


# ---- users -----------------------------------------------------------------------------------


def add_user(session: Session, name: str, role: str, password: str,
             courses: list[str] | None = None, by: str | None = None) -> ConsoleUser:
    """A console account; ``by``: the console user who added it (None: the CLI's user)."""
    name = name.strip()
    if not name or len(name) > 100 or any(c.isspace() for c in name):
        raise ServiceError("a user name is 1 to 100 characters without spaces")
    if role not in ROLES:
        raise ServiceError(f"role must be one of {', '.join(ROLES)}")
    hashed = hash_password(password)
    begin_write(session)
    if session.scalars(select(ConsoleUser).where(ConsoleUser.name == name)).first():
        raise ConflictError(f"user {name!r} already exists")
    user = ConsoleUser(name=name, role=role, password_hash=hashed, created_at=utcnow())
    session.add(user)
    session.flush()
    for course_id in courses or []:
        if session.get(Course, course_id) is None:
            raise NotFoundError(f"course {course_id!r} does not exist")
        session.add(CourseTeacher(user_id=user.id, course_id=course_id))
    audit(session, by or audit_log.cli_actor(), "user.add", f"user:{name}", f"role {role}")
    session.commit()
    _LOGGER.info("console user %s (%s) added", name, role)
    return user


def set_password(session: Session, name: str, password: str, by: str | None = None) -> None:
    hashed = hash_password(password)
    begin_write(session)
    user = find_user(session, name)
    user.password_hash = hashed
    # a new password ends every session of that user
    session.execute(delete(ConsoleSession).where(ConsoleSession.user_id == user.id))
    audit(session, by or audit_log.cli_actor(), "user.password", f"user:{name}")
    session.commit()


def find_user(session: Session, name: str) -> ConsoleUser:
    user = session.scalars(select(ConsoleUser).where(ConsoleUser.name == name)).first()
    if user is None:
        raise NotFoundError(f"user {name!r} does not exist")
    return user


def assign_courses(session: Session, name: str, courses: list[str], by: str | None = None,
                   *, commit: bool = True) -> None:
    """Give a teacher courses; ``by``: the console user who did it (None: the CLI's user);
    ``commit=False``: in the caller's transaction (it commits)."""
    begin_write(session)
    user = find_user(session, name)
    for course_id in courses:
        if session.get(Course, course_id) is None:
            raise NotFoundError(f"course {course_id!r} does not exist")
        if session.get(CourseTeacher, (user.id, course_id)) is None:
            session.add(CourseTeacher(user_id=user.id, course_id=course_id))
    audit(session, by or audit_log.cli_actor(), "user.assign", f"user:{name}",
          "courses " + ", ".join(courses))
    if commit:
        session.commit()


def remove_user(session: Session, name: str, by: str | None = None) -> None:
    begin_write(session)
    user = find_user(session, name)
    if user.role == "admin" and session.scalar(select(func.count()).where(
            ConsoleUser.role == "admin")) == 1:
        raise ConflictError(f"{name} is the last administrator: add another one first")
    session.delete(user)
    audit(session, by or audit_log.cli_actor(), "user.remove", f"user:{name}")
    session.commit()


def unassign_course(session: Session, name: str, course_id: str, by: str | None = None
                    ) -> None:
    """The teacher ``name`` no longer teaches ``course_id`` (nor sees its reports)."""
    begin_write(session)
    user = find_user(session, name)
    row = session.get(CourseTeacher, (user.id, course_id))
    if row is None:
        raise NotFoundError(f"{name} does not teach {course_id}")
    session.delete(row)
    audit(session, by or audit_log.cli_actor(), "user.unassign", f"user:{name}",
          f"course {course_id}")
    session.commit()


def list_users(session: Session) -> list[tuple[ConsoleUser, list[str]]]:
    users = session.scalars(select(ConsoleUser).order_by(ConsoleUser.name)).all()
    taught: dict[int, list[str]] = {}
    for user_id, course_id in session.execute(
        select(CourseTeacher.user_id, CourseTeacher.course_id).order_by(CourseTeacher.course_id)
    ):
        taught.setdefault(user_id, []).append(course_id)
    return [(u, taught.get(u.id, [])) for u in users]


# ---- who is logged in ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsolePrincipal:
    user_id: int
    name: str
    role: str
    csrf_token: str
    courses: frozenset[str]  # courses taught (teachers); admins see every course

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def can_see_course(self, course_id: str | None) -> bool:
        return self.is_admin or (course_id is not None and course_id in self.courses)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(session: Session, user: ConsoleUser, ttl_s: float) -> str:
    """A new session for ``user``; returns the cookie token (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    begin_write(session)
    session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
    session.add(ConsoleSession(token_hash=_digest(token), user_id=user.id,
                               csrf_token=secrets.token_urlsafe(32), created_at=now,
                               expires_at=now + timedelta(seconds=ttl_s)))
    audit(session, user.name, "user.login", f"user:{user.name}")
    session.commit()
    return token


def load_session(session: Session, token: str | None,
                 now: datetime | None = None) -> ConsolePrincipal | None:
    if not token or len(token) > 100:
        return None
    row = session.get(ConsoleSession, _digest(token))
    now = now or utcnow()
    if row is None or not hmac.compare_digest(row.token_hash, _digest(token)):
        return None
    if row.expires_at <= now:
        return None
    user = session.get(ConsoleUser, row.user_id)
    if user is None:
        return None
    courses = frozenset(session.scalars(
        select(CourseTeacher.course_id).where(CourseTeacher.user_id == user.id)
    ).all())
    return ConsolePrincipal(user.id, user.name, user.role, row.csrf_token, courses)


def end_session(session: Session, token: str | None, who: str) -> bool:
    if not token:
        return False
    begin_write(session)
    gone = session.execute(
        delete(ConsoleSession).where(ConsoleSession.token_hash == _digest(token))
    ).rowcount
    if gone:
        audit(session, who, "user.logout", f"user:{who}")
    session.commit()
    return bool(gone)


def check_credentials(session: Session, name: str, password: str) -> ConsoleUser | None:
    user = session.scalars(select(ConsoleUser).where(ConsoleUser.name == name)).first()
    if user is None:
        verify_password(password, _DUMMY_HASH)
        return None
    return user if verify_password(password, user.password_hash) else None


# ---- login limit -----------------------------------------------------------------------------


class LoginLimits:
    """The console's login limits, on the shared rate limiter the API's device limit uses
    (``app.make_limiter``: Redis, else PostgreSQL's table, else memory on SQLite's one
    process), so every API process counts together: ``per_user`` attempts a minute per user
    name and ``per_address`` per client address (the real one behind a trusted proxy). An
    attempt takes its slots before the password is checked, so parallel guesses count."""

    def __init__(self, per_user: Limiter, per_address: Limiter) -> None:
        self.per_user = per_user
        self.per_address = per_address

    @staticmethod
    async def _take(limiter: Limiter, key: str) -> float:
        if limiter.blocking:
            return await run_in_threadpool(limiter.acquire, key)
        return limiter.acquire(key)

    async def acquire(self, name: str, client: str) -> float:
        """0 when this attempt may check a password, else the seconds to wait.
        LimiterUnavailableError when the shared store does not answer."""
        user_wait = await self._take(self.per_user, f"console-login:user:{name.lower()}")
        if user_wait > 0:  # the address's slot stays free for the other names
            return user_wait
        return await self._take(self.per_address, f"console-login:addr:{client}")
