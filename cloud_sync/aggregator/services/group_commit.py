"""Group commit of attendance inserts (SQLite and PostgreSQL).

SQLite has one writer at a time, and with ``synchronous=FULL`` every commit waits for an
fsync. Committing each device's small batch on its own makes concurrent requests queue behind
each other's fsyncs. Here a writer thread per app (a few on PostgreSQL) takes every insert
waiting at that moment, runs them in ONE transaction (one fsync) and hands each caller its own
result. If the shared transaction fails, each job is retried alone, so one bad job cannot
fail the others. Callers block until their rows are durable: the acknowledgement still means
"committed". On PostgreSQL the same saves a transaction (BEGIN/COMMIT round trips and a WAL
flush) per batch and keeps the number of busy server connections low.

The app's state (``cloud_sync.aggregator.state.AppState``) owns the committer and closes it
with the app.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine

from cloud_sync.aggregator.db.session import WRITE

_LOGGER = logging.getLogger(__name__)
MAX_ROWS_PER_COMMIT = 20_000
PG_WRITERS = 4

Job = Callable[[Connection], Any]


class _Item(NamedTuple):
    job: Job
    rows: int
    future: Future[Any]
    order: str


class GroupCommitter:
    def __init__(self, engine: Engine, writers: int = 1) -> None:
        self.engine = engine
        self._closed = False
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"group-commit-{i}", daemon=True)
            for i in range(writers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job, rows: int, order: str = "") -> Any:
        """Run ``job(connection)`` inside a shared write transaction; return its result once
        that transaction is committed (or raise what the job raised on its own).

        ``order``: the jobs of one transaction run sorted on it (stable: a device's jobs in
        the order they came). A job that updates a row other jobs update too (a device's
        status) names that row here: every transaction then locks such rows in one order, so
        two writers on PostgreSQL cannot deadlock on them (each would wait for the other until
        deadlock_timeout, 1 s, and one transaction would fail)."""
        return self._enqueue(job, rows, order).result()

    def submit_async(self, job: Job, rows: int, order: str = "") -> asyncio.Future[Any]:
        """:meth:`submit` for a coroutine: await the result without holding a thread of the
        pool while the commit is waited for. A job cancelled before its transaction started
        is dropped (not written, not acknowledged)."""
        return asyncio.wrap_future(self._enqueue(job, rows, order))

    def _enqueue(self, job: Job, rows: int, order: str) -> Future[Any]:
        if self._closed:
            raise RuntimeError("the group committer is closed (the app is shutting down)")
        future: Future[Any] = Future()
        self._queue.put(_Item(job, rows, future, order))
        return future

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the writers once the jobs queued before this call are committed."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            rows = first.rows
            stop = False
            while rows < MAX_ROWS_PER_COMMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                jobs.append(item)
                rows += item.rows
            # a caller that gave up (an awaiting request cancelled) before its job started
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._commit(sorted(jobs, key=lambda j: j.order))
            if stop:
                return

    def _commit(self, jobs: list[_Item]) -> None:
        results: list[Any] = []
        try:
            with self.engine.connect().execution_options(**WRITE) as conn, conn.begin():
                for item in jobs:
                    results.append(item.job(conn))
        except Exception as err:
            if len(jobs) == 1:
                jobs[0].future.set_exception(err)
                return
            _LOGGER.info("group of %d inserts failed (%s); retrying one by one", len(jobs), err)
            for job in jobs:
                self._commit([job])
            return
        for item, result in zip(jobs, results, strict=True):
            item.future.set_result(result)


def writers_for(engine: Engine) -> int:
    """SQLite has one writer at a time; PostgreSQL overlaps a few transactions (each still
    groups what is waiting when it starts)."""
    return PG_WRITERS if engine.dialect.name == "postgresql" else 1


def run_alone(engine: Engine, job: Job) -> Any:
    """``job`` in a write transaction of its own (no app state: the CLI, a bare session)."""
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        return job(conn)
