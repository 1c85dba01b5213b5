"""Whether the database takes writes, as seen by the real traffic (for /health).

A full disk lets reads go on: ``SELECT 1`` answers while every insert fails. ``WriteWatch``
listens to the engine: a failed write statement or commit marks writes failing (with the
error), the next successful commit clears it. No probe rows, no extra load.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event

_READS = ("select", "pragma", "show", "savepoint", "release", "rollback", "begin")


@dataclass(frozen=True, slots=True)
class WriteFailure:
    error: str
    since: float  # time.time()


class WriteWatch:
    def __init__(self, engine: Engine) -> None:
        self._lock = threading.Lock()
        self._failure: WriteFailure | None = None
        event.listen(engine, "handle_error", self._on_error)
        event.listen(engine, "commit", self._on_commit)

    def _on_error(self, context: Any) -> None:
        statement = (context.statement or "").lstrip().lower()
        if statement.startswith(_READS) and not statement.startswith("select"):
            return
        if statement.startswith("select") and " returning " not in statement:
            return
        error = f"{type(context.original_exception).__name__}: {context.original_exception}"
        error = error.splitlines()[0][:300]
        with self._lock:
            since = self._failure.since if self._failure else time.time()
            self._failure = WriteFailure(error, since)

    def _on_commit(self, _conn: Any) -> None:
        # "commit" fires before the COMMIT is sent; a failed COMMIT reaches handle_error after.
        with self._lock:
            self._failure = None

    def failure(self) -> WriteFailure | None:
        with self._lock:
            return self._failure
