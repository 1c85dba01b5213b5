"""Two `aggregator worker` processes on Redis (RQ) share a backlog of recording jobs, and no
job runs twice, even when the queue delivers it twice. Real Redis on 127.0.0.1:6379, with a
queue name of this test's own (removed afterwards)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import RecordingJob
from cloud_sync.aggregator.services import jobqueue
from tests.cloud_sync.aggregator.conftest import World
from tests.cloud_sync.aggregator.test_recordings import CHUNK, clips, upload  # noqa: F401 (fixture)
from tests.conftest import require

REPO = Path(__file__).resolve().parents[3]  # tests/cloud_sync/aggregator/ -> the repo
REDIS_URL = os.environ.get("AGGREGATOR_TEST_REDIS", "redis://127.0.0.1:6379/0")
JOBS = 3


def _redis_up() -> bool:
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        return bool(Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except RedisError:
        return False


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'aggregator.db'}"


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Iterator[AggregatorSettings]:
    require(_redis_up(), f"Redis not reachable at {REDIS_URL}")
    queue = f"test-recordings-{uuid.uuid4().hex[:10]}"
    yield aggregator_config.load(
        None, database_url=db_url, data_dir=tmp_path / "data", rate_limit_per_min=100000,
        recording_transcode=False, recording_chunk_max_bytes=CHUNK,
        recordings_enabled=True, redis_url=REDIS_URL,
        job_queue_name=queue)
    from redis import Redis

    conn = Redis.from_url(REDIS_URL)
    keys = [k for k in conn.scan_iter(match=f"*{queue}*")]
    keys += [k for k in conn.scan_iter(match="rq:*recording-*")
             if any(j in k.decode() for j in _JOB_IDS)]
    if keys:
        conn.delete(*keys)
    conn.srem("rq:queues", f"rq:queue:{queue}")  # RQ's set of queue names


_JOB_IDS: list[str] = []


@pytest.mark.slow(seconds=75)
def test_two_workers_share_a_backlog_and_run_no_job_twice(
        world: World, settings: AggregatorSettings, clips: dict[str, Path],  # noqa: F811
        app_client: Any) -> None:
    w, c = world, world.client
    jobs = []
    for i in range(JOBS):  # the upload enqueues each job on RQ
        up = upload(c, w.admin, clips["walking_short"], w.at(0, 9, 5 + i))
        jobs.append(up["job"]["id"])
    _JOB_IDS[:] = jobs
    queue = jobqueue._rq_queue(settings)
    assert queue.count == JOBS
    for job_id in jobs:  # every job delivered twice: the second delivery must be a no-op
        queue.enqueue(jobqueue.RQ_FUNCTION, job_id, job_id=f"recording-{job_id}-dup")
    assert queue.count == 2 * JOBS

    env = {**os.environ, "AGGREGATOR_DATABASE_URL": settings.database_url.get_secret_value(),
           "AGGREGATOR_DATA_DIR": str(settings.data_dir), "AGGREGATOR_REDIS_URL": REDIS_URL,
           "AGGREGATOR_JOB_QUEUE_NAME": settings.job_queue_name,
           "AGGREGATOR_RECORDING_TRANSCODE": "false"}
    workers = [subprocess.Popen(
        [sys.executable, "-m", "cloud_sync.aggregator.cli", "worker", "--burst",
         "--name", name], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for name in ("worker-a", "worker-b")]
    outputs = []
    for proc in workers:
        _, err = proc.communicate(timeout=240)
        outputs.append(err)
        assert proc.returncode == 0, err
    assert "worker on the redis (RQ) queue (burst)" in outputs[0]
    assert queue.count == 0

    sessions = app_client.app.state.ctx.sessions
    with sessions() as session:
        rows = session.scalars(select(RecordingJob).where(RecordingJob.id.in_(jobs))).all()
    assert len(rows) == JOBS
    for row in rows:
        assert row.status == "completed", (row.id, row.error)
        assert row.attempts == 1  # claimed once: the duplicate delivery was skipped
        assert row.finished_at - row.started_at < timedelta(minutes=4)
    by = {row.worker.split("/")[0] for row in rows}
    assert by == {"worker-a", "worker-b"}, by  # both took part in the backlog
    ran = [int(e.strip().splitlines()[-1].split()[0]) for e in outputs]
    assert sum(ran) == JOBS and all(n >= 1 for n in ran), outputs
