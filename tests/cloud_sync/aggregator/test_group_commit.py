"""The group committer awaited from the event loop (heartbeats and events over HTTP): the answer
comes once the transaction is committed, and a request that gave up before its job started
is not written (it was never acknowledged, the device sends it again)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from sqlalchemy import Connection, text

from cloud_sync.aggregator.db.session import make_engine
from cloud_sync.aggregator.services.group_commit import GroupCommitter


def test_submit_async_durable_when_answered_and_cancelled_job_dropped(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'gc.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (v INTEGER)")
    committer = GroupCommitter(engine)
    gate = threading.Event()
    running = threading.Event()

    def blocker(conn: Connection) -> None:
        running.set()
        gate.wait(10)  # holds the writer: what is submitted meanwhile waits in the queue

    def insert(value: int):  # type: ignore[no-untyped-def]
        def job(conn: Connection) -> int:
            conn.execute(text("INSERT INTO t VALUES (:v)"), {"v": value})
            return value

        return job

    def stored() -> list[int]:
        with engine.connect() as conn:  # another connection: only committed rows
            return sorted(v for (v,) in conn.exec_driver_sql("SELECT v FROM t"))

    async def scenario() -> int:
        first = threading.Thread(target=committer.submit, args=(blocker, 1))
        first.start()
        # the writer runs the blocker (a fixed sleep was not enough under load: the writer then
        # took the blocker and the two inserts as one group, before the cancel)
        assert await asyncio.to_thread(running.wait, 10)
        gave_up = asyncio.ensure_future(committer.submit_async(insert(1), 1))
        kept = asyncio.ensure_future(committer.submit_async(insert(2), 1))
        await asyncio.sleep(0.05)
        gave_up.cancel()
        # the cancel reaches the job's concurrent future in a done-callback of the loop: let it
        # run before the writer is released (else the writer may start the job first)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gate.set()
        result = await asyncio.wait_for(kept, 10)
        assert stored() == [2]  # committed when the answer came
        first.join(5)
        return result

    try:
        assert asyncio.run(scenario()) == 2
        assert committer.submit(insert(3), 1) == 3  # the writer goes on
        assert stored() == [2, 3]
    finally:
        committer.close()
        engine.dispose()
