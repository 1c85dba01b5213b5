"""The aggregator's one settings model (TOML file + ``AGGREGATOR_*`` environment overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from cloud_sync.protocol import Identifier
from cloud_sync.settings import (
    Networks,
    TimeZoneName,
    TomlSettings,
    example_toml,
    load_settings,
    network_list,
)


class AggregatorSettings(TomlSettings):
    """Settings of the central aggregator."""

    model_config = SettingsConfigDict(
        env_prefix="AGGREGATOR_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    database_url: SecretStr | None = Field(
        default=None,
        title="Database URL",
        description="SQLAlchemy URL: sqlite:////abs/path.db or postgresql+psycopg://user@host/db "
        "(postgresql:// means the same); unset = SQLite in data_dir/aggregator.db. Masked in "
        "`config show` (may hold a password).",
    )

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_database_url(value.get_secret_value())
        return value
    host: str = Field(
        default="127.0.0.1", title="Bind address", description="Address the API listens on."
    )
    port: int = Field(
        default=8000, ge=1, le=65535, title="Port", description="Port the API listens on."
    )
    data_dir: Path = Field(
        default=Path("data/aggregator"),
        title="Data directory",
        description="The SQLite database (unless database_url is set), kept photos (only if "
        "keep_photos) and other local files (/var/lib/classroom-aggregator on a server).",
    )
    model_dir: Path | None = Field(
        default=None,
        title="Model directory",
        description="Model files for server-side enrollment (default: the fetcher's directory).",
    )
    mqtt_url: SecretStr | None = Field(
        default=None,
        title="MQTT broker URL",
        description="mqtt://user:pass@host:1883 to run the MQTT bridge; unset = HTTP only.",
    )
    redis_url: SecretStr | None = Field(
        default=None,
        title="Redis URL",
        description="redis://[:password@]host:6379/0: recording jobs go through RQ on Redis "
        "(any number of `aggregator worker` processes on any machines take them), and the "
        "per-device rate limit and the messages between aggregator processes (cache "
        "invalidation, live feed) go through Redis instead of PostgreSQL. Unset = the "
        "aggregator's own database for all of it (memory on SQLite). Masked in `config show`.",
    )
    redis_prefix: Identifier = Field(
        default="aggregator",
        title="Redis key prefix",
        description="Prefix of this deployment's Redis keys and channel (several deployments "
        "can share one Redis).",
    )
    serve_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        title="API processes",
        description="Processes `aggregator serve` runs on this server (uvicorn workers "
        "sharing the port; `serve --workers N`). More than 1 needs PostgreSQL; about one per "
        "core. Not the recording job workers (`aggregator worker`).",
    )
    instance_name: str = Field(
        default="",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]*$",
        title="Instance name",
        description="Name of this server in /health, /metrics and the MQTT bridge's client "
        "ids (empty = the host name). Give each server of a deployment its own.",
    )
    mqtt_share_group: Identifier = Field(
        default="aggregator",
        title="MQTT shared subscription group",
        description="The bridges of every process and server subscribe as "
        "$share/<group>/classroom/...: the broker gives each device message to one of them.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().split("://", 1)[0].lower() not in {
                "redis", "rediss", "unix"}:
            raise ValueError("redis_url must look like redis://host:6379/0 (or rediss://, "
                             "unix://)")
        return value

    mqtt_client_id: Identifier = Field(
        default="aggregator-bridge",
        title="MQTT bridge client id",
        description="Client id prefix of the MQTT bridges; each process's bridge adds "
        "-<instance_name>-<pid>-<6 random hex> (clean sessions in one shared subscription: "
        "docs/MQTT.md).",
    )
    mqtt_max_message_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=100_000_000,
        title="Largest MQTT message",
        description="The bridge refuses (dead-letters, without parsing) a message larger than "
        "this; the shipped Mosquitto config caps messages at the same 1 MiB. A full batch of "
        "1,000 records is ~0.45 MB.",
    )
    dead_letter_keep_bytes: int = Field(
        default=4096,
        ge=0,
        le=1_048_576,
        title="Dead letter bytes kept",
        description="Only the first this-many bytes of a refused MQTT message are stored "
        "(the reason records its full size).",
    )
    dead_letter_max_rows: int = Field(
        default=10_000,
        ge=100,
        le=10_000_000,
        title="Dead letters kept",
        description="The dead_letters table keeps at most this many rows (oldest dropped).",
    )
    dead_letter_max_age_days: float = Field(
        default=30.0,
        ge=1,
        le=3650,
        title="Dead letter age (days)",
        description="Dead letters older than this are deleted (when a new one is stored).",
    )
    ha_discovery: bool = Field(
        default=True,
        title="Home Assistant discovery",
        description="Publish Home Assistant MQTT discovery configs and state per room "
        "(only when mqtt_url is set).",
    )
    ha_discovery_prefix: str = Field(
        default="homeassistant",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_/-]+$",
        title="Home Assistant discovery prefix",
        description="Topic prefix Home Assistant listens on for discovery.",
    )
    ha_device_url: str | None = Field(
        default="http://{device_id}.local:8080/",
        max_length=200,
        pattern=r"^https?://.*\{device_id\}",
        title="Device status page URL",
        description="URL of a device's status page, with {device_id}; Home Assistant links "
        "each room to its first device's page (configuration_url). Unset: no link.",
    )
    rate_limit_per_min: int = Field(
        default=100,
        ge=1,
        le=100000,
        title="Device rate limit",
        description="Requests per minute allowed per device before 429.",
    )
    keep_photos: bool = Field(
        default=False,
        title="Keep enrollment photos",
        description="Keep uploaded enrollment photos; by default only the embedding is stored.",
    )
    timezone: TimeZoneName = Field(
        default="UTC",
        title="Default time zone",
        description="IANA time zone of rooms created without one; schedules are local times "
        "of the room's time zone.",
    )
    late_after_min: float = Field(
        default=10.0,
        ge=0,
        le=240,
        title="Late after (minutes)",
        description="A student first seen more than this many minutes after the session start "
        "is reported 'late' instead of 'present'.",
    )
    early_arrival_min: float = Field(
        default=10.0,
        ge=0,
        le=120,
        title="Early arrival window (minutes)",
        description="A sighting up to this many minutes before a session starts (and in no "
        "other session of the room) counts for that session.",
    )
    events_keep_days: int = Field(
        default=180,
        ge=1,
        le=3650,
        title="Keep events (days)",
        description="Device events (alerts, occupancy, attention) older than this are deleted "
        "(on start and hourly), so the events table stays bounded.",
    )
    attendance_keep_days: int = Field(
        default=400,
        ge=1,
        le=3650,
        title="Keep attendance records (days)",
        description="Attendance records older than this (by class time) are deleted by the "
        "retention purge (on start and hourly): a school year and the next term for "
        "disputes. Set it to your school's records-retention rule (docs/PRIVACY.md).",
    )
    heartbeat_keep_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        title="Keep heartbeats (days)",
        description="Device heartbeats (health readings, no personal data) older than this "
        "are deleted by the retention purge, except the newest of each device boot, which "
        "places late records of that boot in time (kept until attendance_keep_days).",
    )
    audit_keep_days: int = Field(
        default=730,
        ge=30,
        le=3650,
        title="Keep audit log (days)",
        description="Audit log entries (who viewed, exported, corrected, erased what) older "
        "than this are deleted by the retention purge.",
    )
    erasure_policy: Literal["delete", "pseudonymise"] = Field(
        default="pseudonymise",
        title="Erasure policy",
        description="What `students erase` does with an erased student's attendance records "
        "(face data is always deleted): 'delete' them, or 'pseudonymise' them (moved to a "
        "random id nothing links back to the student, so class statistics stay right).",
    )
    ws_queue_messages: int = Field(
        default=256,
        ge=1,
        le=100_000,
        title="Live feed queue per client",
        description="Messages a /ws/events client may fall behind by; a client further behind "
        "is dropped (closed with code 1013), so a slow client cannot grow the server's memory.",
    )
    ws_max_clients: int = Field(
        default=100,
        ge=1,
        le=10_000,
        title="Live feed clients",
        description="Most /ws/events clients at once (more are refused with code 1013).",
    )
    partition_months_ahead: int = Field(
        default=3,
        ge=1,
        le=36,
        title="Partitions ahead (PostgreSQL)",
        description="Monthly attendance partitions created ahead of the current month on start.",
    )
    sqlite_synchronous: str = Field(
        default="FULL",
        pattern="^(NORMAL|FULL)$",
        title="SQLite synchronous",
        description="PRAGMA synchronous in WAL mode: FULL survives power loss after an ack; "
        "NORMAL is faster but may lose the last acknowledged commits on power loss.",
    )
    max_photo_bytes: int = Field(
        default=10_000_000,
        ge=10_000,
        le=100_000_000,
        title="Maximum photo size",
        description="Largest enrollment photo accepted, in bytes (413 above).",
    )
    max_video_bytes: int = Field(
        default=50_000_000,
        ge=100_000,
        le=1_000_000_000,
        title="Maximum enrolment video size",
        description="Largest enrolment video accepted, in bytes (413 above); a few seconds of "
        "phone video is 5-20 MB.",
    )
    release_upload_max_bytes: int = Field(
        default=2_000_000_000,
        ge=1_000_000,
        le=64_000_000_000,
        title="Largest release archive",
        description="A signed release bundle uploaded in the console (Devices, Add a release) "
        "as a .tar or .tar.gz is refused above this many bytes, and so is one that unpacks to "
        "more; it is streamed to a temporary file under data_dir/releases/incoming (a bundle "
        "is ~300 MB).",
    )
    detector_model: Literal["yunet", "full_range", "short_range"] = Field(
        default="yunet",
        title="Enrollment detector model",
        description="Face detector used for server-side enrollment (yunet, or BlazeFace "
        "full_range / short_range, which need ai-edge-litert); keep it equal to the devices' "
        "detector.model (alignment and the dlib box calibration depend on it).",
    )
    embedders: list[Literal["sface", "dlib"]] = Field(
        default=["sface", "dlib"],
        min_length=1,
        max_length=2,
        title="Face embedders",
        description="Descriptors computed for every enrolled photo, one per embedder, so a "
        "fleet can switch `recognition.embedder` without new photos. The first is what "
        "`GET /schedule` serves when a device does not name its embedder.",
    )
    enroll_min_face_px: int = Field(
        default=40,
        ge=20,
        le=2000,
        title="Enrollment minimum face size",
        description="Enrollment photos whose face is narrower than this many pixels are "
        "rejected (appliance roster build uses the same 40).",
    )
    auth_cache_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        title="Credential cache",
        description="Seconds a verified device key / admin token is cached in memory "
        "(0 = look up every request). Deleting a device clears the cache at once.",
    )
    min_free_disk_mb: int = Field(
        default=500,
        ge=0,
        le=10_000_000,
        title="Minimum free disk space (MiB)",
        description="/health says 'degraded' (disk: low) when less than this is free where "
        "the data lives (the SQLite file's file system, else data_dir).",
    )
    record_descriptor_days: int = Field(
        default=14,
        ge=0,
        le=365,
        title="Keep record descriptors (days)",
        description="Days the face descriptor a device sent with a record is kept, so that a "
        "\"not this student\" correction can make it a negative example; 0 = not stored.",
    )
    unknown_faces_enabled: bool = Field(
        default=False,
        title="Accept unknown faces",
        description="Accept devices' crops + descriptors of unrecognised faces for walk-in "
        "enrolment in the console (off by default: these are photos of people who are not "
        "enrolled; devices need unknown_faces.enabled too).",
    )
    unknown_face_keep_hours: float = Field(
        default=72,
        ge=1,
        le=2160,
        title="Keep unknown faces (hours)",
        description="Unknown-face crops and descriptors not labelled or dismissed are deleted "
        "this many hours after they arrived.",
    )
    unknown_group_distance: float = Field(
        default=0.45,
        ge=0.05,
        le=2.0,
        title="Unknown face grouping distance",
        description="Unknown faces whose descriptors are within this distance (chained) are "
        "shown as one likely person.",
    )
    console_session_ttl_s: float = Field(
        default=43_200,
        ge=300,
        le=2_592_000,
        title="Console session lifetime",
        description="Seconds a console login lasts (logout ends it at once).",
    )
    console_login_max_attempts: int = Field(
        default=5,
        ge=1,
        le=1000,
        title="Console login attempts",
        description="Console login attempts allowed per minute per user name (counted before "
        "the password is checked, so parallel guesses count; kept in the shared rate limit "
        "store, so every API process counts together). Per address: "
        "console_login_max_per_address.",
    )
    console_login_max_per_address: int = Field(
        default=30,
        ge=1,
        le=10_000,
        title="Console logins per address",
        description="Console login attempts allowed per minute from one client address "
        "(successful ones too: a school's NAT address logs many teachers in at 8:00), over "
        "every user name: a ceiling on guessing across many names. Kept in the shared rate "
        "limit store (PostgreSQL or Redis), so every API process counts together.",
    )
    trusted_proxies: Networks = Field(
        default="127.0.0.1",
        max_length=1000,
        pattern=r"^[0-9A-Fa-f.:/, ]*$",
        title="Trusted reverse proxies",
        description="Comma-separated addresses or networks (CIDR) of reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto headers are believed: the console's login limit "
        "then counts per real client address, and its session cookie is Secure when the proxy "
        "says https. Empty = none (the connection's address and scheme).",
    )

    def trusted_proxy_list(self) -> list[str]:
        return network_list(self.trusted_proxies)

    console_offline_after_s: float = Field(
        default=180,
        ge=30,
        le=86_400,
        title="Device offline after",
        description="The console shows a device offline when its last heartbeat is older "
        "than this many seconds (devices send one a minute).",
    )
    console_refresh_s: float = Field(
        default=10,
        ge=1,
        le=3600,
        title="Dashboard refresh",
        description="Seconds between live refreshes of the console dashboard.",
    )
    recordings_enabled: bool = Field(
        default=False,
        title="Recorded sessions",
        description="Allow uploads of session recordings (video of a class: every face in "
        "it, not only descriptors) and their processing jobs. Off by default; the files are "
        "deleted after recording_keep_days (docs/PRIVACY.md).",
    )
    recordings_dir: Path | None = Field(
        default=None,
        title="Recordings directory",
        description="Uploaded session recordings and their browser copies; unset = "
        "data_dir/recordings. With workers on other machines: a directory they all mount "
        "at the same path.",
    )
    recording_max_bytes: int = Field(
        default=8 * 1024**3,
        ge=1024 * 1024,
        le=200 * 1024**3,
        title="Largest recording",
        description="An upload announcing a larger file is refused (413) before any byte.",
    )
    recording_quota_bytes: int = Field(
        default=64 * 1024**3,
        ge=1024 * 1024,
        le=100 * 1024**4,
        title="Recording quota per uploader",
        description="Bytes of recordings one uploader (a console user, an admin token) may "
        "hold at once: announced uploads and kept files (a file deleted by retention, a "
        "rejected or deleted recording no longer counts). More is refused (413) at announce.",
    )
    recording_upload_expire_hours: float = Field(
        default=24.0,
        ge=0.1,
        le=720,
        title="Abandoned uploads expire after (hours)",
        description="An upload that received no byte for this long is abandoned: its file is "
        "deleted and it is rejected (the hourly retention purge), so its announced size stops "
        "counting against the quota and the disk.",
    )
    recording_ffmpeg_memory_mb: int = Field(
        default=3072,
        ge=256,
        le=65_536,
        title="ffmpeg memory limit (MiB)",
        description="Address space each ffprobe/ffmpeg child (the upload check, the browser "
        "copy) may use (prlimit --as): a file that needs more fails with a reason instead of "
        "taking the server's memory. 4K transcodes fit in 3 GiB; raise it for larger "
        "servers' thread counts if transcodes fail with 'Cannot allocate memory'.",
    )
    recording_chunk_max_bytes: int = Field(
        default=32 * 1024**2,
        ge=64 * 1024,
        le=1024**3,
        title="Largest upload chunk",
        description="One PUT of a resumable upload carries at most this many bytes.",
    )
    recording_max_duration_s: float = Field(
        default=6 * 3600.0,
        ge=10,
        le=48 * 3600,
        title="Longest recording (s)",
        description="The upload check refuses a recording longer than this (a class is "
        "hours at most: a longer duration is a damaged header).",
    )
    recording_min_duration_s: float = Field(
        default=1.0,
        ge=0.1,
        le=3600,
        title="Shortest recording (s)",
        description="The upload check refuses a recording shorter than this.",
    )
    recording_keep_days: float = Field(
        default=30.0,
        ge=0.01,
        le=3650,
        title="Recording retention (days)",
        description="Recording files (original and browser copy) are deleted this many days "
        "after the upload; the attendance, timelines and instructor results derived from them "
        "are kept.",
    )
    recording_analysis_fps: float = Field(
        default=15.0,
        ge=0,
        le=120,
        title="Frames analysed per second of recording",
        description="A job analyses about this many frames per second of video (every n-th "
        "frame of a faster recording; a device's camera runs at 15): the device's rate, at a "
        "half or a quarter of the work of every frame. 0 = every frame.",
    )
    recording_transcode: bool = Field(
        default=True,
        title="Browser copy of recordings",
        description="After analysis a job makes an H.264/AAC MP4 and a poster frame with "
        "ffmpeg for playback in the console.",
    )
    instructor_gap_s: float = Field(
        default=10.0,
        ge=0.5,
        le=3600,
        title="Instructor gap (s)",
        description="A stretch of a recording at least this long without the instructor's "
        "face is reported as a gap.",
    )
    job_queue_name: Identifier = Field(
        default="recordings",
        title="Job queue name",
        description="The RQ queue name on Redis (several districts can share a Redis server "
        "with different names).",
    )
    job_lease_s: float = Field(
        default=120.0,
        ge=10,
        le=3600,
        title="Job heartbeat lease (s)",
        description="A running job whose worker has not reported for this long is failed "
        "(\"the worker stopped\") and can be retried.",
    )
    job_timeout_s: float = Field(
        default=12 * 3600.0,
        ge=60,
        le=7 * 86_400,
        title="Job time limit (s)",
        description="A job running longer than this is stopped and failed.",
    )
    worker_poll_s: float = Field(
        default=2.0,
        ge=0.1,
        le=60,
        title="Worker poll interval (s)",
        description="How often an idle `aggregator worker` looks for a queued job in the "
        "database queue.",
    )
    log_level: str = Field(
        default="INFO",
        pattern="^(DEBUG|INFO|WARNING|ERROR)$",
        title="Log level",
        description="Log level (stdout).",
    )


SCHEMES = {"sqlite": "sqlite", "sqlite+pysqlite": "sqlite", "postgresql": "postgresql+psycopg",
           "postgresql+psycopg": "postgresql+psycopg"}
SCHEME_HINTS = {
    "postgres": "postgres:// is not a SQLAlchemy scheme: write postgresql+psycopg://",
    "postgresql+psycopg2": "psycopg2 is not installed: write postgresql+psycopg:// (psycopg 3)",
    "postgresql+asyncpg": "the aggregator is synchronous: write postgresql+psycopg://",
}


def check_database_url(url: str) -> str:
    """The SQLAlchemy driver name of ``url`` (normalised), or a ValueError that says which
    URLs work. Never echoes the URL (it may hold a password)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in SCHEMES:
        return SCHEMES[scheme]
    hint = SCHEME_HINTS.get(scheme, f"unsupported database scheme {scheme!r}" if scheme
                            else "not a URL")
    raise ValueError(f"{hint} (supported: sqlite:////abs/path.db, "
                     "postgresql+psycopg://user@host:5432/db)")


def database_url(settings: AggregatorSettings) -> str:
    """The effective SQLAlchemy URL: ``database_url`` (``postgresql://`` made explicit as
    psycopg 3), or SQLite in ``data_dir``."""
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
        scheme, rest = url.split("://", 1)
        return f"{check_database_url(url)}://{rest}" if scheme.lower() != "sqlite" else url
    return f"sqlite:///{settings.data_dir / 'aggregator.db'}"


def load(path: Path | str | None = None, **overrides: object) -> AggregatorSettings:
    return load_settings(AggregatorSettings, path, env_var="AGGREGATOR_CONFIG", **overrides)


EXAMPLE_HEADER = """\
Aggregator configuration (generated by `aggregator config example`; every key is documented
here with its bounds, and every key left commented out takes the default shown).
Environment variables override this file: AGGREGATOR_<KEY>,
e.g. AGGREGATOR_DATABASE_URL=postgresql+psycopg://attendance@db.school.example/attendance.
`aggregator config show` prints the effective values, secrets masked.
"""

EXAMPLE_VALUES: dict[str, object] = {}


def example() -> str:
    """The documented example file (``config/aggregator.example.toml``)."""
    return example_toml(AggregatorSettings, EXAMPLE_HEADER, EXAMPLE_VALUES)


def recordings_dir(settings: AggregatorSettings) -> Path:
    """Where recording files live: ``recordings_dir``, or ``data_dir/recordings``."""
    return settings.recordings_dir or settings.data_dir / "recordings"
