"""One line that says what is wrong with the database and how to fix it, instead of a
traceback (`aggregator db upgrade`, `serve` and the other commands)."""

from __future__ import annotations

import re

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError


def _where(url: str) -> tuple[str, str, str, str]:
    """host:port, database, user, and the createdb command for ``url`` (no password)."""
    parsed = make_url(url)
    host = parsed.host or "localhost"
    port = str(parsed.port or 5432)
    user = parsed.username or "postgres"
    database = parsed.database or ""
    return f"{host}:{port}", database, user, f"createdb -h {host} -p {port} -U {user} {database}"


def explain(err: BaseException, url: str) -> str:
    """A one-line operator message for ``err`` raised while opening/migrating ``url``."""
    if isinstance(err, NoSuchModuleError | ArgumentError):
        return (f"unsupported database_url ({err}): use sqlite:////abs/path.db or "
                "postgresql+psycopg://user@host:5432/db")
    text = str(getattr(err, "orig", None) or err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    lowered = text.lower()
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        path = make_url(url).database or ""
        if "unable to open database file" in lowered:
            return (f"cannot open the SQLite database {path}: check that its directory exists "
                    "and is writable by this user")
        if "disk is full" in lowered or "no space left" in lowered:
            return f"the disk holding {path} is full: free some space and retry"
        return f"SQLite database {path}: {first}"
    where, database, user, createdb = _where(url)
    if re.search(r'database "[^"]*" does not exist', lowered):
        return (f"PostgreSQL database {database!r} does not exist on {where}: create it "
                f"({createdb}) or correct database_url")
    if "password authentication failed" in lowered or re.search(r'role "[^"]*" does not', lowered):
        return (f"PostgreSQL at {where} refused user {user!r} ({first}): check the user and "
                "password in database_url")
    if any(s in lowered for s in ("connection refused", "could not connect", "timeout expired",
                                  "name or service not known", "could not translate host",
                                  "no route to host", "connection timed out",
                                  "server closed the connection")):
        return (f"cannot reach PostgreSQL at {where} ({first}): is the server running, and "
                "are the host and port in database_url right?")
    return f"database error at {where}: {first}"


DATABASE_ERRORS = (SQLAlchemyError, OSError)
