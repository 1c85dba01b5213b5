"""The recording job queue: the aggregator's database by default, RQ on Redis when
``redis_url`` is set.

Either way the ``recording_jobs`` row is the truth and a worker claims a job by a conditional
update (services/recordings.py ``claim``), so a job never runs twice, even if a queue delivered
it twice.

* **Database** (embedded default: nothing else to run): ``aggregator worker`` polls for the
  oldest queued row every ``worker_poll_s`` and claims it.
* **Redis** (a district: many workers on many machines): enqueueing puts the job id on the RQ
  queue ``job_queue_name``; each ``aggregator worker`` is an RQ worker (it forks a work horse
  per job, so a job that crashes takes only its horse down). Why RQ: pure Python (one wheel for
  x86_64 and aarch64), only ``redis`` as a dependency, plain functions as jobs, atomic dequeue,
  and a worker model (fork per job, heartbeats, abandoned-job registry) that fits long CPU-bound
  jobs; Dramatiq's extra middleware and at-least-once redelivery buy nothing here since the
  database claim already makes a redelivered job a no-op. Redis keeps nothing the database
  does not: a worker that starts re-enqueues the queued rows Redis lost (a Redis restart).

A worker that dies mid-job stops heartbeating; ``fail_stale`` (run by every worker loop and by
the API's job listing) marks the job failed with that reason, and it can be retried.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from cloud_sync.aggregator.config import AggregatorSettings
from cloud_sync.aggregator.db.models import JobWorker, RecordingJob
from cloud_sync.aggregator.db.session import begin_write
from cloud_sync.aggregator.services import recordings as svc
from cloud_sync.aggregator.services.common import UnavailableError, utcnow

_LOGGER = logging.getLogger(__name__)
RQ_FUNCTION = "cloud_sync.aggregator.services.jobqueue.run_rq_job"

# The settings of the `aggregator worker` process; its RQ work horses are forked from it and
# so see them (set by :func:`work`).
_WORKER: dict[str, Any] = {}
# Set when `aggregator worker` (database queue) is told to stop: the running job stops too.
STOPPING = threading.Event()


def _redis(settings: AggregatorSettings) -> Any:
    from redis import Redis

    assert settings.redis_url is not None
    return Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=30,
                          socket_connect_timeout=5)


def _rq_queue(settings: AggregatorSettings, connection: Any = None) -> Any:
    from rq import Queue

    return Queue(settings.job_queue_name, connection=connection or _redis(settings),
                 default_timeout=int(settings.job_timeout_s) + 60)


def _rq_id(job: RecordingJob) -> str:
    return f"recording-{job.id}-{job.attempts}-{int(job.created_at.timestamp())}"


def enqueue(settings: AggregatorSettings, job: RecordingJob) -> None:
    """Tell the queue a job is queued (the row already says so). Database queue: nothing to
    do. Redis: RQ enqueue; if Redis is down the row stays queued and the next worker start
    enqueues it (UnavailableError tells the caller)."""
    if settings.redis_url is None:
        return
    from redis.exceptions import RedisError

    try:
        _rq_queue(settings).enqueue(RQ_FUNCTION, job.id, job_id=_rq_id(job),
                                    result_ttl=3600, failure_ttl=7 * 86_400)
    except RedisError as err:
        raise UnavailableError(f"job {job.id} is queued but Redis is unreachable ({err}); a "
                               "worker picks it up when it starts") from err


def requeue_lost(settings: AggregatorSettings, session: Session) -> int:
    """Redis: enqueue the queued rows whose RQ job Redis does not have (lost by a restart,
    or Redis was down when they were queued)."""
    from rq.job import Job

    conn = _redis(settings)
    queue = _rq_queue(settings, conn)
    count = 0
    for job in session.scalars(select(RecordingJob).where(RecordingJob.status == "queued")):
        if not Job.exists(_rq_id(job), connection=conn):
            queue.enqueue(RQ_FUNCTION, job.id, job_id=_rq_id(job), result_ttl=3600,
                          failure_ttl=7 * 86_400)
            count += 1
    session.rollback()
    if count:
        _LOGGER.info("%d queued job(s) were not on Redis: enqueued", count)
    return count


def run_claimed(settings: AggregatorSettings, sessions: sessionmaker[Session],
                job_id: str, worker: str) -> str:
    from cloud_sync.aggregator.services.recording_job import run_job

    return run_job(settings, sessions, job_id, worker)


def run_rq_job(job_id: str) -> str:
    """The RQ job function (in a work horse forked from ``aggregator worker``): claim the row,
    run it. A job that is not queued any more (cancelled, deleted, taken) is skipped."""
    import os

    from cloud_sync.aggregator.db.session import make_session_factory

    settings: AggregatorSettings = _WORKER["settings"]
    engine = _WORKER["engine"]
    engine.dispose(close=False)  # the parent's pooled connections are not ours after fork
    sessions = make_session_factory(engine, info=_WORKER["info"])
    worker = f"{_WORKER['name']}/{os.getpid()}"  # the worker process / this work horse
    with sessions() as session:
        svc.fail_stale(session, settings.job_lease_s)
        if not svc.claim(session, job_id, worker):
            _LOGGER.info("job %s is not queued any more: skipped", job_id)
            return "skipped"
    return run_claimed(settings, sessions, job_id, worker)


def work(settings: AggregatorSettings, engine: Any, sessions: sessionmaker[Session], *,
         burst: bool = False, stop: threading.Event | None = None,
         name: str | None = None) -> int:
    """`aggregator worker`: run jobs until stopped (``burst``: until the queue is empty);
    returns how many jobs it ran."""
    from cloud_sync.aggregator.services.recording_job import worker_name

    name = name or worker_name()
    stop = stop or threading.Event()
    if settings.redis_url is not None:
        from rq import Worker

        # imported once here, not in every forked work horse (the pipeline's modules)
        from cloud_sync.aggregator.services import recording_job

        recording_job.preload()
        _WORKER.update(settings=settings, engine=engine, name=name,
                       info=dict(sessions.kw.get("info", {})))
        with sessions() as session:
            svc.fail_stale(session, settings.job_lease_s)
            requeue_lost(settings, session)
        conn = _redis(settings)
        started = utcnow()
        rq_worker = Worker([_rq_queue(settings, conn)], connection=conn,
                           name=f"{name}-{uuid.uuid4().hex[:6]}".replace(":", "-"))
        rq_worker.work(burst=burst, logging_level="WARNING")
        with sessions() as session:
            return int(session.scalar(select(func.count()).select_from(RecordingJob).where(
                RecordingJob.worker.like(f"{name}/%"), RecordingJob.finished_at >= started))
                or 0)
    ran = 0
    started = utcnow()
    try:
        while not stop.is_set():
            with sessions() as session:
                beat(session, name, started)
                svc.fail_stale(session, settings.job_lease_s)
                job_id = svc.claim_next(session, name)
            if job_id is None:
                if burst:
                    break
                stop.wait(settings.worker_poll_s)
                continue
            run_claimed(settings, sessions, job_id, name)
            ran += 1
    finally:
        with sessions() as session:
            begin_write(session)
            session.execute(delete(JobWorker).where(JobWorker.name == name))
            session.commit()
    return ran


def beat(session: Session, name: str, started: datetime) -> None:
    """The worker ``name`` is alive now (its row in ``job_workers``)."""
    begin_write(session)
    row = session.get(JobWorker, name)
    if row is None:
        session.add(JobWorker(name=name, started_at=started, seen_at=utcnow()))
    else:
        row.seen_at = utcnow()
    session.commit()


def alive_after(settings: AggregatorSettings) -> float:
    """Seconds without a sign after which a worker counts as gone."""
    return max(60.0, 3 * settings.worker_poll_s)


def workers_alive(session: Session, settings: AggregatorSettings) -> int | None:
    """How many workers are alive: database-queue workers seen lately, plus running jobs with
    a fresh heartbeat (a worker busy with a long job does not poll); with Redis, RQ's own
    worker registry. None when that cannot be told (Redis does not answer)."""
    if settings.redis_url is not None:
        try:
            from rq import Worker

            return int(Worker.count(connection=_redis(settings)))
        except Exception:
            return None
    since = utcnow() - timedelta(seconds=alive_after(settings))
    idle = session.scalar(select(func.count()).select_from(JobWorker).where(
        JobWorker.seen_at >= since)) or 0
    busy = session.scalar(select(func.count()).select_from(RecordingJob).where(
        RecordingJob.status == "running",
        RecordingJob.heartbeat_at >= utcnow() - timedelta(seconds=settings.job_lease_s))) or 0
    return int(idle) + int(busy)
