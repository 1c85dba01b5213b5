"""`aggregator ...`: serve the API and administer the central database."""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.aggregator.releases_cli import app as releases_app
from cloud_sync.config_commands import config_commands
from cloud_sync.settings import ConfigError

app = typer.Typer(
    help="Classroom attendance aggregator.", no_args_is_help=True, add_completion=False
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
devices_app = typer.Typer(help="Room devices.", no_args_is_help=True)
admin_app = typer.Typer(help="Admin credentials.", no_args_is_help=True)
faces_app = typer.Typer(help="Face enrollment.", no_args_is_help=True)
students_app = typer.Typer(help="Students: add one (many: `import students`); privacy: "
                           "consent, erasure, export, retention.", no_args_is_help=True)
schedules_app = typer.Typer(help="Class times (one at a time; many: `import schedules`).",
                            no_args_is_help=True)
mqtt_app = typer.Typer(help="The MQTT broker's files.", no_args_is_help=True)
users_app = typer.Typer(help="Web console users (admin | teacher).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(devices_app, name="devices")
app.add_typer(admin_app, name="admin")
app.add_typer(faces_app, name="faces")
app.add_typer(students_app, name="students")
app.add_typer(schedules_app, name="schedules")
app.add_typer(mqtt_app, name="mqtt")
app.add_typer(users_app, name="users")
app.add_typer(releases_app, name="releases")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: env AGGREGATOR_CONFIG)."),
]
console = Console(stderr=True)


def load_or_exit(path: Path | None, **overrides: object) -> aggregator_config.AggregatorSettings:
    try:
        return aggregator_config.load(path, **overrides)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level, stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _sessions(settings: aggregator_config.AggregatorSettings):  # type: ignore[no-untyped-def]
    """Engine and session factory on the migrated database; a database that cannot be
    opened or migrated is one line on stderr (what is wrong, how to fix it) and exit 1."""
    from cloud_sync.aggregator.db.errors import DATABASE_ERRORS, explain
    from cloud_sync.aggregator.db.migrate import upgrade_engine
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory

    url = aggregator_config.database_url(settings)
    engine = None
    try:
        engine = make_engine(url, sqlite_synchronous=settings.sqlite_synchronous)
        upgrade_engine(engine)
    except DATABASE_ERRORS as err:
        if engine is not None:
            engine.dispose()
        typer.echo(f"error: {explain(err, url)}", err=True)
        raise typer.Exit(1) from err
    return engine, make_session_factory(engine)


T = TypeVar("T")


def _with_session(config: Path | None, work: Callable[[Any], T]) -> T:
    """Run ``work(session)`` on the migrated database of the configuration; a refusal of the
    service (unknown room, token ...) is one 'error:' line and exit 1."""
    from cloud_sync.aggregator.services.common import ServiceError

    settings = load_or_exit(config)
    engine, sessions = _sessions(settings)
    try:
        with sessions() as session:
            return work(session)
    except ServiceError as err:
        typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(1) from err
    finally:
        engine.dispose()


config_app = config_commands(aggregator_config.AggregatorSettings, load_or_exit,
                             aggregator_config.example, "AGGREGATOR_CONFIG")
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate the configuration (file + environment): exit 0 and 'ok', or the errors
    (each naming its field, and the environment variable that set it) and exit 2."""
    settings = load_or_exit(config)
    backend = aggregator_config.database_url(settings).split(":", 1)[0]
    typer.echo(f"configuration ok (database: {backend})")


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default: settings).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: settings).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, max=64,
        help="Processes sharing the port (default: settings.serve_workers); more than 1 needs "
        "PostgreSQL.")] = None,
) -> None:
    """Migrate the database and serve the API (uvicorn; --workers N processes)."""
    import os

    import uvicorn

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if workers is not None:
        overrides["serve_workers"] = workers
    settings = load_or_exit(config, **overrides)
    _logging(settings.log_level)
    url = aggregator_config.database_url(settings)
    if settings.serve_workers > 1 and not url.startswith("postgresql"):
        typer.echo(f"error: --workers {settings.serve_workers} needs PostgreSQL: SQLite takes "
                   "one writing process (set database_url = "
                   "\"postgresql+psycopg://user@host/db\", or run one worker)", err=True)
        raise typer.Exit(2)
    # `kill -USR1 <pid>` writes every thread's stack to stderr: what a server that does not
    # stop, or hangs, is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    engine, _ = _sessions(settings)  # a clear one-line error before the server starts
    engine.dispose()
    if settings.serve_workers == 1:
        from cloud_sync.aggregator.app import create_app

        app_ = create_app(settings)
        _freeze_gc()
        # proxy headers: the app's own middleware, for settings.trusted_proxies only
        uvicorn.run(app_, host=settings.host, port=settings.port, proxy_headers=False,
                    log_level=settings.log_level.lower(), access_log=False)
        return
    # Several processes: uvicorn starts (and restarts) the workers, each builds its app from
    # the same file and environment (app.app_from_env); the port is shared.
    import tempfile

    if config is not None:
        os.environ["AGGREGATOR_CONFIG"] = str(config.resolve())
    os.environ["AGGREGATOR_HOST"] = settings.host
    os.environ["AGGREGATOR_PORT"] = str(settings.port)
    os.environ["AGGREGATOR_SERVE_WORKERS"] = str(settings.serve_workers)
    with tempfile.TemporaryDirectory(prefix="aggregator-metrics-") as metrics_dir:
        # prometheus_client's multiprocess mode: /metrics of any worker counts them all
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        uvicorn.run("cloud_sync.aggregator.app:app_from_env", factory=True,
                    host=settings.host, port=settings.port, workers=settings.serve_workers,
                    proxy_headers=False, log_level=settings.log_level.lower(),
                    access_log=False)


def _freeze_gc() -> None:
    # Long-lived objects (modules, models, compiled SQL) leave the collector's view, and full
    # collections run less often: they were the latency spikes under many small requests.
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


@app.command()
def worker(
    config: ConfigOption = None,
    burst: Annotated[bool, typer.Option(
        "--burst", help="Run the queued jobs, then exit (default: wait for more).")] = False,
    name: Annotated[str | None, typer.Option(
        help="Worker name in job rows (default: host:pid).", max=200)] = None,
) -> None:
    """Process recorded-session jobs: from the database queue, or from Redis (RQ) when
    redis_url is set (then run as many workers, on as many machines, as the backlog needs).
    SIGTERM/Ctrl-C: stop after the current job (database queue: the job stops at once and
    is failed, retryable)."""
    import signal
    import threading

    from cloud_sync.aggregator.services import jobqueue
    from cloud_sync.aggregator.services.ingest import (
        DESCRIPTOR_DAYS_INFO_KEY,
        EARLY_ARRIVAL_INFO_KEY,
    )

    if name is not None and (not name.strip() or any(c.isspace() for c in name)):
        typer.echo("error: --name must be a non-empty name without spaces", err=True)
        raise typer.Exit(2)
    settings = load_or_exit(config)
    _logging(settings.log_level)
    engine, _ = _sessions(settings)
    from cloud_sync.aggregator.db.session import make_session_factory

    sessions = make_session_factory(engine, info={
        EARLY_ARRIVAL_INFO_KEY: settings.early_arrival_min,
        DESCRIPTOR_DAYS_INFO_KEY: settings.record_descriptor_days})
    stop = threading.Event()
    if settings.redis_url is None:
        def on_signal(signum: int, _frame: Any) -> None:
            logging.getLogger(__name__).info("signal %d: stopping", signum)
            stop.set()
            jobqueue.STOPPING.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    queue = "redis (RQ)" if settings.redis_url is not None else "database"
    typer.echo(f"worker on the {queue} queue{' (burst)' if burst else ''}", err=True)
    try:
        ran = jobqueue.work(settings, engine, sessions, burst=burst, stop=stop, name=name)
    except Exception as err:
        from redis.exceptions import RedisError

        if not isinstance(err, RedisError):
            raise
        typer.echo(f"error: Redis unreachable ({err}): check redis_url", err=True)
        raise typer.Exit(1) from err
    finally:
        engine.dispose()
    typer.echo(f"{ran} job(s) run", err=True)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply the Alembic migrations (creates the SQLite file if needed)."""
    from cloud_sync.aggregator.db import partitions
    from cloud_sync.aggregator.db.migrate import current_revision

    settings = load_or_exit(config)
    _logging(settings.log_level)
    engine, _ = _sessions(settings)
    partitions.ensure_ahead(engine, settings.partition_months_ahead)
    typer.echo(f"database at revision {current_revision(engine)}")
    engine.dispose()


@devices_app.command("add")
def devices_add(
    room: Annotated[str, typer.Option("--room", help="Room the device is mounted in.")],
    device_id: Annotated[str | None, typer.Option("--id", help="Device id (default: made)")] = None,
    config: ConfigOption = None,
) -> None:
    """Register a device and print its API key ONCE (only its hash is stored)."""
    from cloud_sync.aggregator.services.devices import add_device

    device, key = _with_session(config, lambda s: add_device(s, room, device_id))
    typer.echo(f"device_id: {device.id}\nroom_id: {device.room_id}\napi_key: {key}")
    typer.echo("Store the key now: it is not shown again.", err=True)


@admin_app.command("create-token")
def admin_create_token(
    name: Annotated[str, typer.Option(help="Who or what the token is for.")] = "admin",
    config: ConfigOption = None,
) -> None:
    """Create an admin token and print it ONCE (only its hash is stored)."""
    from cloud_sync.aggregator.services.devices import create_admin_token

    row, token = _with_session(config, lambda s: create_admin_token(s, name))
    typer.echo(token)
    typer.echo(f"Store the token now (id {row.id}): it is not shown again.", err=True)


@admin_app.command("list-tokens")
def admin_list_tokens(config: ConfigOption = None) -> None:
    """List the admin tokens: id, name, created, last used (never the secret)."""
    from cloud_sync.aggregator.services.devices import list_admin_tokens

    rows = _with_session(config, list_admin_tokens)
    table = Table(title="admin tokens")
    for column in ("id", "name", "created", "last used"):
        table.add_column(column)
    for row in rows:
        last = row.last_used_at.isoformat(timespec="minutes") if row.last_used_at else "never"
        table.add_row(str(row.id), row.name, row.created_at.isoformat(timespec="minutes"), last)
    Console(width=120).print(table)


@admin_app.command("revoke-token")
def admin_revoke_token(
    token_id: Annotated[int, typer.Argument(help="Token id, from `admin list-tokens`.")],
    config: ConfigOption = None,
) -> None:
    """Revoke (delete) an admin token. A running server stops accepting it within
    auth_cache_s seconds (at once when revoked through the API)."""
    from cloud_sync.aggregator.services.devices import revoke_admin_token

    row = _with_session(config, lambda s: revoke_admin_token(s, token_id))
    typer.echo(f"admin token {token_id} ({row.name}) revoked")


@mqtt_app.command("acl")
def mqtt_acl(
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the file here (atomically) instead of printing it.")] = None,
    config: ConfigOption = None,
) -> None:
    """The Mosquitto ACL: the bridge, Home Assistant, and one block per registered device
    that may write only under its own site/room/device. Regenerate after adding, moving or
    deleting a device, then reload Mosquitto (SIGHUP)."""
    import os
    import tempfile

    from cloud_sync.aggregator import mqtt_acl as acl

    text = _with_session(config, lambda s: acl.render(acl.registered_devices(s)))
    if output is None:
        typer.echo(text, nl=False)
        return
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, output)
    typer.echo(f"wrote {output}; reload Mosquitto (e.g. systemctl reload mosquitto)", err=True)


@app.command("import")
def import_csv(
    kind: Annotated[str, typer.Argument(help="students, courses, enrollments, rooms, schedules")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    config: ConfigOption = None,
) -> None:
    """Import a CSV file; every bad row is reported with its line number, good rows are kept."""
    from cloud_sync.aggregator.services.common import ServiceError
    from cloud_sync.aggregator.services.csv_import import REQUIRED, import_csv

    if kind not in REQUIRED:
        typer.echo(f"error: kind must be one of {', '.join(sorted(REQUIRED))}", err=True)
        raise typer.Exit(2)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        typer.echo(f"error: {file} is not UTF-8 ({err})", err=True)
        raise typer.Exit(2) from err
    settings = load_or_exit(config)
    engine, sessions = _sessions(settings)
    try:
        with sessions() as session:
            report = import_csv(session, kind, text, settings.timezone)
    except ServiceError as err:
        typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(2) from err
    finally:
        engine.dispose()
    typer.echo(
        f"{kind}: {report.rows} rows, {report.created} created, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.errors)} errors"
    )
    for error in report.errors:
        typer.echo(f"  line {error.row}: {error.error}")
    if report.errors:
        raise typer.Exit(1)


@faces_app.command("encode")
def faces_encode(
    batch: Annotated[Path, typer.Option("--batch", exists=True, file_okay=False,
                                        help="Folder of photos named <student_id>.jpg")],
    config: ConfigOption = None,
) -> None:
    """Enrol every photo in a folder (photos/S001.jpg, or photos/S001/*.jpg for several): one
    embedding per usable photo. Hidden files are ignored."""
    from appliance.vision.enroll import IMAGE_SUFFIXES, collect_photos
    from cloud_sync.aggregator.db.models import Student
    from cloud_sync.aggregator.services import faces
    from cloud_sync.aggregator.services.common import ServiceError
    from cloud_sync.aggregator.services.privacy import require_consent

    settings = load_or_exit(config)
    # photos/S001.jpg (student S001) or photos/S001/*.jpg (several photos of S001), read as
    # `appliance roster build` reads them
    files = [(student_id, path) for student_id, paths in
             collect_photos(batch, IMAGE_SUFFIXES).items() for path in paths]
    if not files:
        typer.echo(f"no photos in {batch}", err=True)
        raise typer.Exit(1)
    engine, sessions = _sessions(settings)
    encoder = faces.FaceEncoder(settings)
    table = Table(title=f"faces encode {batch}")
    for column in ("file", "student", "result", "detail"):
        table.add_column(column)
    ok = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress, sessions() as session:
            task = progress.add_task("encoding", total=len(files))
            for student_id, path in files:
                shown = str(path.relative_to(batch))
                progress.update(task, description=f"encoding {shown}")
                try:
                    if session.get(Student, student_id) is None:
                        raise ServiceError(f"unknown student {student_id!r}")
                    require_consent(session, student_id)
                    session.rollback()
                    data = path.read_bytes()
                    result = encoder.encode(faces.decode_image(data))
                    if result.embedding is None:
                        raise ServiceError(result.reason or "no usable face")
                    row = faces.store_embedding(session, settings, student_id,
                                                result.vectors or result.embedding,
                                                result.quality, f"batch:{shown}", data,
                                                path.suffix.lower())
                except ServiceError as err:
                    session.rollback()
                    table.add_row(shown, student_id, "[red]rejected[/red]", err.message)
                else:
                    ok += 1
                    quality = "" if row.quality is None else f"quality {row.quality:.2f}"
                    table.add_row(shown, student_id, "[green]enrolled[/green]", quality)
                progress.advance(task)
    finally:
        engine.dispose()
    Console().print(table)
    typer.echo(f"{ok} of {len(files)} photos enrolled")
    if ok < len(files):
        raise typer.Exit(1)


@faces_app.command("reencode")
def faces_reencode(config: ConfigOption = None) -> None:
    """Add the descriptors of every configured embedder (setting `embedders`) to the photos
    enrolled before it was configured, from the kept photos (`keep_photos`); lists the
    students who still lack an embedder's descriptors (no photo kept: enrol them again).
    The migration path for rosters enrolled with dlib only."""
    from cloud_sync.aggregator.services import faces
    from cloud_sync.protocol import EMBEDDER_IDS

    settings = load_or_exit(config)
    wanted = [EMBEDDER_IDS[n] for n in dict.fromkeys(settings.embedders)]
    engine, sessions = _sessions(settings)
    try:
        with sessions() as session:
            report = faces.reencode(session, faces.FaceEncoder(settings), wanted)
    finally:
        engine.dispose()
    for line in report.failed:
        typer.echo(f"failed {line}", err=True)
    for student_id, lacking in report.need_photos.items():
        typer.echo(f"student {student_id}: no {', '.join(lacking)} descriptor and no kept "
                   "photo: enrol again", err=True)
    typer.echo(f"{report.added} descriptors added; {len(report.need_photos)} students need "
               "new photos")
    if report.failed or report.need_photos:
        raise typer.Exit(1)


@contextlib.contextmanager
def _service(settings: aggregator_config.AggregatorSettings) -> Iterator[tuple[Any, Any]]:
    """(engine, session factory) on the migrated database; a ServiceError is printed as
    ``error: ...`` with exit code 1; the engine is disposed of at the end."""
    from cloud_sync.aggregator.services.common import ServiceError

    engine, sessions = _sessions(settings)
    try:
        yield engine, sessions
    except ServiceError as err:
        typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(1) from err
    finally:
        engine.dispose()


def _after_face_change(settings: aggregator_config.AggregatorSettings, engine: Any,
                       sessions: Any) -> None:
    """Deleted face data: scrub the database files, tell the devices (printed on stderr)."""
    from cloud_sync.aggregator.services.privacy import scrub

    scrub(engine)
    typer.echo(_notify_devices(settings, sessions), err=True)


def _notify_devices(settings: aggregator_config.AggregatorSettings, sessions: Any) -> str:
    """Publish the changed rosters' retained notices (as the server's bridge does) so devices
    pull at once; without MQTT they pull within their roster_refresh_s."""
    from cloud_sync.aggregator.api.notify import publish_notices

    if settings.mqtt_url is None:
        return "devices pull the new roster within their sync.roster_refresh_s (no MQTT here)"
    from cloud_sync.aggregator.mqtt_bridge import publish_once
    from cloud_sync.protocol import EMBEDDER_IDS

    notices: list[tuple[str, str, str]] = []
    publish_notices(sessions, lambda *notice: notices.append(notice),
                    EMBEDDER_IDS[settings.embedders[0]])
    try:
        publish_once(settings, notices)
    except (OSError, RuntimeError, ValueError) as err:
        return f"roster notice not published ({err}): devices pull within roster_refresh_s"
    return f"roster notice published to {len(notices)} room(s): devices pull at once"


@students_app.command("consent")
def students_consent(
    student_id: Annotated[str, typer.Argument(help="Student id, e.g. S001.")],
    action: Annotated[str, typer.Argument(help="grant | withdraw | show")],
    note: Annotated[str, typer.Option(help="e.g. the consent form's reference.")] = "",
    config: ConfigOption = None,
) -> None:
    """Record consent to face recognition granted or withdrawn (withdrawal deletes the
    student's face data and tells devices to drop it), or show it."""
    from cloud_sync.aggregator.services import audit, privacy

    states = {"grant": "granted", "withdraw": "withdrawn"}
    if action not in {*states, "show"}:
        typer.echo("error: action must be grant, withdraw or show", err=True)
        raise typer.Exit(2)
    settings = load_or_exit(config)
    with _service(settings) as (engine, sessions):
        with sessions() as session:
            if action == "show":
                out = privacy.consent_of(session, student_id)
            else:
                out = privacy.set_consent(session, student_id, states[action],  # type: ignore[arg-type]
                                          audit.cli_actor(), note)
        if action == "withdraw":
            _after_face_change(settings, engine, sessions)
    typer.echo(out.model_dump_json(indent=2))


@students_app.command("erase")
def students_erase(
    student_id: Annotated[str, typer.Argument(help="Student id, e.g. S001.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    config: ConfigOption = None,
) -> None:
    """Erase a student: face data deleted everywhere, records deleted or pseudonymised by
    erasure_policy, the student removed. Cannot be undone."""
    from cloud_sync.aggregator.services import audit, privacy

    settings = load_or_exit(config)
    if not yes:
        typer.confirm(f"Erase {student_id} ({settings.erasure_policy} records)? This cannot "
                      "be undone", abort=True)
    with _service(settings) as (engine, sessions):
        with sessions() as session:
            out = privacy.erase(session, student_id, settings.erasure_policy,
                                audit.cli_actor())
        _after_face_change(settings, engine, sessions)
    typer.echo(out.model_dump_json(indent=2))


@students_app.command("export")
def students_export(
    student_id: Annotated[str, typer.Argument(help="Student id, e.g. S001.")],
    fmt: Annotated[str, typer.Option("--format", help="json or csv")] = "json",
    out: Annotated[Path | None, typer.Option("--out", help="File (default: stdout).")] = None,
    config: ConfigOption = None,
) -> None:
    """Everything held about a student (subject access request) as JSON or CSV."""
    import json

    from cloud_sync.aggregator.services import audit, privacy

    if fmt not in {"json", "csv"}:
        typer.echo("error: --format must be json or csv", err=True)
        raise typer.Exit(2)
    settings = load_or_exit(config)
    with _service(settings) as (_engine, sessions), sessions() as session:
        data = privacy.export(session, student_id)
        audit.record_now(session, audit.cli_actor(), "student.export",
                         privacy.subject(student_id), f"format={fmt}")
    text = (privacy.export_csv(data) if fmt == "csv"
            else json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"written to {out}", err=True)


@students_app.command("purge")
def students_purge(config: ConfigOption = None) -> None:
    """Run the retention purge now (the server runs it on start and hourly); print counts."""
    from cloud_sync.aggregator.services.retention import purge

    settings = load_or_exit(config)
    engine, sessions = _sessions(settings)
    try:
        with sessions() as session:
            counts = purge(session, settings)
    finally:
        engine.dispose()
    typer.echo(" ".join(f"{k}={v}" for k, v in counts.items()))



# ---- a first class without CSV files: students add, schedules add --now ------------------

@contextlib.contextmanager
def _admin_session(config: Path | None) -> Iterator[Any]:
    """A database session for one command; a ServiceError or a bad value is one line and
    exit 1."""
    from pydantic import ValidationError

    with _service(load_or_exit(config)) as (_engine, sessions), sessions() as session:
        try:
            yield session
        except ValidationError as err:  # a ServiceError is _service's to print
            typer.echo(f"error: {err.errors()[0]['msg']}", err=True)
            raise typer.Exit(1) from err


@students_app.command("add")
def students_add(
    student_id: Annotated[str, typer.Argument(help="Student id, e.g. S001 (photo: S001.jpg).")],
    name: Annotated[str, typer.Option("--name", help="Full name, as the status page shows it.")],
    course: Annotated[str | None, typer.Option("--course", help="Enrol in this course.")] = None,
    config: ConfigOption = None,
) -> None:
    """Add a student (kept if the id exists) and enrol them in a course."""
    from cloud_sync.aggregator.db.models import Enrollment, Student
    from cloud_sync.aggregator.services import admin, admin_schemas

    with _admin_session(config) as session:
        if session.get(Student, student_id) is None:
            admin.create_row(session, "students", admin_schemas.StudentIn(id=student_id, name=name))
            typer.echo(f"student {student_id} ({name}) added")
        if course and session.get(Enrollment, (student_id, course)) is None:
            admin.create_enrollment(
                session, admin_schemas.EnrollmentIn(student_id=student_id, course_id=course))
            typer.echo(f"student {student_id} enrolled in {course}")


@schedules_app.command("add")
def schedules_add(
    room: Annotated[str, typer.Option("--room", help="Room id, e.g. LAB-301.")],
    course: Annotated[str, typer.Option("--course", help="Course id (made if new).")],
    course_name: Annotated[str | None, typer.Option("--course-name", help="Name of a new "
                                                    "course (default: its id).")] = None,
    now: Annotated[bool, typer.Option("--now", help="A one-off class today, starting now "
                                      "(room's time zone), for a first try.")] = False,
    minutes: Annotated[int, typer.Option("--minutes", min=5, max=720,
                                         help="Length of the --now class.")] = 60,
    weekday: Annotated[str | None, typer.Option("--weekday", help="Mon..Sun (weekly).")] = None,
    start: Annotated[str | None, typer.Option("--start", help="HH:MM, local.")] = None,
    end: Annotated[str | None, typer.Option("--end", help="HH:MM, local.")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Replace the class(es) it overlaps in the room (they lose its days; "
        "without it an overlap is refused, naming the other class).")] = False,
    config: ConfigOption = None,
) -> None:
    """Schedule a course in a room: weekly (--weekday --start --end) or once, now (--now)."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    from cloud_sync.aggregator.db.models import Course, Room
    from cloud_sync.aggregator.services import admin, admin_schemas
    from cloud_sync.aggregator.services.common import ServiceError

    if now == bool(weekday or start or end) or (not now and not (weekday and start and end)):
        typer.echo("error: give --now, or all of --weekday, --start and --end", err=True)
        raise typer.Exit(2)
    with _admin_session(config) as session:
        row = session.get(Room, room)
        if row is None:
            raise ServiceError(f"room {room!r} does not exist (`aggregator import rooms`)")
        if session.get(Course, course) is None:
            admin.create_row(session, "courses",
                             admin_schemas.CourseIn(id=course, name=course_name or course))
            typer.echo(f"course {course} added")
        if now:
            local = datetime.now(ZoneInfo(row.timezone)).replace(second=0, microsecond=0)
            first = local - timedelta(minutes=5)  # already running
            last = min(local + timedelta(minutes=minutes), local.replace(hour=23, minute=59))
            data = admin_schemas.ScheduleIn(
                course_id=course, room_id=room, weekday=local.weekday(),
                start_time=first.time() if first.date() == local.date() else "00:00",
                end_time=last.time(), effective_from=local.date(), effective_to=local.date())
        else:
            data = admin_schemas.ScheduleIn(course_id=course, room_id=room, weekday=weekday,
                                    start_time=start, end_time=end)
        out, replaced = admin.create_schedule_replacing(session, data, replace)
    for text in replaced:
        typer.echo(f"replaced {text}")
    when = (f"on {out.effective_from}" if now else
            f"every {['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'][out.weekday]}")
    typer.echo(f"schedule {out.id}: {course} in {room} {when}, "
               f"{out.start_time:%H:%M}-{out.end_time:%H:%M} (room time)")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        typer.echo("error: empty password", err=True)
        raise typer.Exit(2)
    return password


PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from stdin (one line).")
]


def _users_call(config: Path | None, action: Callable[[Any], object]) -> object:
    with _service(load_or_exit(config)) as (_engine, sessions), sessions() as session:
        return action(session)



@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="Login name (no spaces).")],
    role: Annotated[str, typer.Option("--role", help="admin or teacher.")],
    course: Annotated[list[str] | None, typer.Option(
        "--course", help="A course the teacher teaches (repeat the option).")] = None,
    password_stdin: PasswordStdin = False,
    config: ConfigOption = None,
) -> None:
    """Create a console user; the password is typed twice (or read from stdin), never
    defaulted, and stored as an Argon2id hash."""
    from cloud_sync.aggregator.console import accounts

    if role not in accounts.ROLES:  # before the password prompt, not after it
        typer.echo(f"error: --role must be one of {', '.join(accounts.ROLES)}", err=True)
        raise typer.Exit(2)
    password = _read_password(password_stdin)
    _users_call(config, lambda s: accounts.add_user(s, name, role, password, course or []))
    typer.echo(f"user {name} ({role}) created")


@users_app.command("passwd")
def users_passwd(
    name: Annotated[str, typer.Argument(help="Login name.")],
    password_stdin: PasswordStdin = False,
    config: ConfigOption = None,
) -> None:
    """Set a user's password (ends every session of that user)."""
    from cloud_sync.aggregator.console import accounts

    password = _read_password(password_stdin)
    _users_call(config, lambda s: accounts.set_password(s, name, password))
    typer.echo(f"password of {name} changed")


@users_app.command("assign")
def users_assign(
    name: Annotated[str, typer.Argument(help="Login name of a teacher.")],
    course: Annotated[list[str], typer.Option("--course", help="Course id (repeatable).")],
    config: ConfigOption = None,
) -> None:
    """Let a teacher see more courses."""
    from cloud_sync.aggregator.console import accounts

    _users_call(config, lambda s: accounts.assign_courses(s, name, course))
    typer.echo(f"{name} teaches {', '.join(course)}")


@users_app.command("remove")
def users_remove(
    name: Annotated[str, typer.Argument(help="Login name.")],
    config: ConfigOption = None,
) -> None:
    """Delete a user (and end their sessions)."""
    from cloud_sync.aggregator.console import accounts

    _users_call(config, lambda s: accounts.remove_user(s, name))
    typer.echo(f"user {name} removed")


@users_app.command("list")
def users_list(config: ConfigOption = None) -> None:
    """The console users, their role and courses."""
    from cloud_sync.aggregator.console import accounts

    rows = _users_call(config, lambda s: accounts.list_users(s))
    table = Table(title="console users")
    for column in ("name", "role", "courses", "created"):
        table.add_column(column)
    for user, courses in rows:  # type: ignore[attr-defined]
        table.add_row(user.name, user.role, ", ".join(courses), f"{user.created_at:%Y-%m-%d}")
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
