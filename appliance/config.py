"""The appliance's one settings model.

Loaded from a TOML file (``appliance run --config FILE`` or env ``APPLIANCE_CONFIG``) with
environment overrides such as ``APPLIANCE_CAMERA__SOURCE=/dev/video0``. Every field documents
itself: ``appliance config show`` prints the effective values (secrets masked) and
``appliance config describe`` prints this reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
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
from models import DEFAULT_MODEL_DIR


class Section(BaseModel):
    """A config section: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class DeviceConfig(Section):
    device_id: Identifier = Field(
        default="dev-appliance",
        title="Device id",
        description="Unique id of this appliance, as registered at the aggregator.",
    )
    room_id: Identifier = Field(
        default="LAB-301",
        title="Room id",
        description="Room this appliance is mounted in; selects the roster.",
    )
    site: Identifier = Field(
        default="main",
        title="Site",
        description="School or campus id, used in MQTT topic names.",
    )
    timezone: TimeZoneName = Field(
        default="UTC",
        title="Time zone",
        description="IANA time zone of the room's schedule (e.g. Europe/Berlin).",
    )


class PathsConfig(Section):
    data_dir: Path = Field(
        default=Path("data/appliance"),
        title="Data directory",
        description="Where the SQLite outbox and roster cache live (/var/lib/... on a device).",
    )
    model_dir: Path = Field(
        default=DEFAULT_MODEL_DIR,
        title="Model directory",
        description="Where `appliance models fetch` puts the verified model files.",
    )


class CameraConfig(Section):
    source: str = Field(
        default="0",
        min_length=1,
        title="Camera source",
        description="'picamera2', a USB index ('0'), a device ('/dev/video0'), an RTSP/HTTP "
        "URL, or a video file path.",
    )
    width: int = Field(
        default=1280, ge=160, le=4096, title="Width", description="Requested frame width in pixels."
    )
    height: int = Field(
        default=720,
        ge=120,
        le=3072,
        title="Height",
        description="Requested frame height in pixels.",
    )
    fps: float = Field(
        default=15.0, gt=0, le=120, title="Frame rate", description="Requested capture frame rate."
    )
    loop_file: bool = Field(
        default=False,
        title="Loop video files",
        description="Restart a video-file source at its end instead of stopping (demos).",
    )
    reopen_backoff_max_s: float = Field(
        default=30.0,
        ge=1,
        le=600,
        title="Reopen backoff ceiling",
        description="Longest wait between attempts to reopen a failed camera, in seconds.",
    )


class DetectorConfig(Section):
    model: Literal["yunet", "full_range", "short_range"] = Field(
        default="yunet",
        title="Face detector",
        description="yunet (the default: OpenCV's YuNet, finds faces from ~10 px at any frame "
        "size, needs no extra runtime); full_range or short_range: BlazeFace (needs the "
        "optional ai-edge-litert package; full_range up to ~5 m, short_range within ~2 m, "
        "both lose faces under ~60 px in a 720p frame unless tiled). See docs/RECOGNITION.md.",
    )
    score_threshold: float = Field(
        default=0.6,
        ge=0.05,
        le=0.99,
        title="Detection score threshold",
        description="Minimum detector confidence for a face.",
    )
    nms_iou: float = Field(
        default=0.3,
        ge=0.05,
        le=0.95,
        title="NMS IoU",
        description="Overlap above which detections are merged (weighted NMS).",
    )
    min_face_px: int = Field(
        default=24,
        ge=8,
        le=1000,
        title="Minimum face size",
        description="Faces narrower than this many pixels (in the full-resolution frame) are "
        "ignored. Crops below the recognition quality floor get no descriptor anyway.",
    )
    input_width: int = Field(
        default=640,
        ge=0,
        le=4096,
        title="Detector input width",
        description="yunet only: frames wider than this are scaled down to this width for "
        "detection (0: detect at full resolution); crops for recognition always come from the "
        "full-resolution frame. 640 finds faces from ~24 px in a 1280x720 frame at a quarter "
        "of the full-resolution cost.",
    )
    detect_every_frames: int = Field(
        default=3,
        ge=1,
        le=10,
        title="Detect every N frames",
        description="The detector runs on every Nth frame (and at once after a camera cut); "
        "the tracker carries the faces' tracks over the frames between, and crops for "
        "descriptors come only from frames the detector ran on. A face that appears is found "
        "at most N-1 frames later (3: 80 ms at 25 fps, 200 ms at 10 fps). 1: every frame. "
        "Detection is most of the per-frame CPU (docs/RECOGNITION.md).",
    )
    refine_landmarks: bool = Field(
        default=True,
        title="Refine small faces at full resolution",
        description="yunet only, when it detects on a scaled-down copy (input_width): each "
        "crop picked for a descriptor whose face was under 48 px in the detector's input is "
        "detected again on its full-resolution crop, so alignment uses exact landmarks "
        "(door benchmark, 50 px faces in 720p: 86 -> 93 % identified per sighting). One "
        "small detector pass per descriptor, not per frame.",
    )
    tiles: int = Field(
        default=1,
        ge=1,
        le=4,
        title="Tiles per row",
        description="BlazeFace only: split wide frames into this many overlapping tiles per row "
        "(1 = no tiling), for small faces in a wide classroom view.",
    )
    threads: int = Field(
        default=2,
        ge=1,
        le=8,
        title="Detector threads",
        description="Threads of the detector (OpenCV or the TFLite interpreter); the pipeline "
        "keeps one core free for descriptors.",
    )


class RecognitionConfig(Section):
    embedder: Literal["sface", "dlib"] = Field(
        default="sface",
        title="Face embedder",
        description="Which descriptor the device computes: `sface` (OpenCV Zoo SFace, int8, "
        "cosine distance; the default) or `dlib` (dlib ResNet as in face_recognition, the "
        "alternative). A roster made by another embedder is refused (its descriptors are not "
        "comparable); the aggregator computes both at enrolment.",
    )
    threshold: float | None = Field(
        default=None,
        ge=0.05,
        le=1.5,
        title="Match distance threshold",
        description="Largest descriptor distance accepted as a match (lower is stricter); unset: "
        "the embedder's calibrated value (sface 0.50 cosine, dlib 0.48 Euclidean; see "
        "docs/RECOGNITION.md).",
    )
    margin: float | None = Field(
        default=None,
        ge=0.0,
        le=0.5,
        title="Best/second-best margin",
        description="The best student must be at least this much closer than the next one; "
        "unset: the embedder's calibrated value (sface 0.0, dlib 0.04).",
    )
    max_embeddings_per_track: int = Field(
        default=6,
        ge=1,
        le=50,
        title="Embeddings per track",
        description="At most this many descriptors are computed for one track before it "
        "is decided.",
    )
    roster_file: Path | None = Field(
        default=None,
        title="Roster file",
        description="roster.json made by `appliance roster build`, used when no aggregator "
        "schedule is configured; unset and no sync = no roster (every face is unknown).",
    )
    max_embeddings_per_frame: int = Field(
        default=2,
        ge=1,
        le=16,
        title="Descriptors per frame",
        description="At most this many face descriptors are computed in one frame (the best "
        "crops first); bounds the per-frame work on a Pi.",
    )
    embed_min_gap_frames: int = Field(
        default=3,
        ge=1,
        le=100,
        title="Frames between descriptors",
        description="A track gets its next descriptor no sooner than this many frames after "
        "the last one, from the best crop seen in between.",
    )
    embed_refresh_frames: int = Field(
        default=8,
        ge=1,
        le=1000,
        title="Descriptor refresh",
        description="After this many frames a track gets a descriptor even if its crops did "
        "not beat its best earlier sample (so it still collects the votes it needs).",
    )
    reverify_frames: int = Field(
        default=25,
        ge=2,
        le=10000,
        title="Re-verification period",
        description="A decided track gets one more descriptor every this many frames (when a "
        "frame has room after undecided tracks); if it disagrees with the track's earlier "
        "ones, another person took the place of the face and the track is split.",
    )
    split_distance: float | None = Field(
        default=None,
        ge=0.05,
        le=2.0,
        title="Track split distance",
        description="A descriptor farther than this from the mean of its track's earlier ones "
        "is another person: the track is split. Unset: the embedder's value (sface 0.65 "
        "cosine, dlib 0.6 Euclidean).",
    )
    min_quality: float = Field(
        default=0.35,
        ge=0.0,
        le=1.0,
        title="Minimum crop quality",
        description="Crops below this face quality (size, sharpness, frontal pose, 0..1) never "
        "get a descriptor.",
    )


    def match_threshold(self) -> float:
        """``threshold``, or the configured embedder's calibrated one."""
        from appliance.vision.embedding import spec

        return self.threshold if self.threshold is not None else spec(self.embedder).threshold

    def split_at(self) -> float:
        """``split_distance``, or the configured embedder's."""
        from appliance.vision.embedding import spec

        return (self.split_distance if self.split_distance is not None
                else spec(self.embedder).split_distance)

    def match_margin(self) -> float:
        """``margin``, or the configured embedder's calibrated one."""
        from appliance.vision.embedding import spec

        return self.margin if self.margin is not None else spec(self.embedder).margin

class DecisionConfig(Section):
    votes_required: int = Field(
        default=2,
        ge=1,
        le=20,
        title="Agreeing samples",
        description="A track is marked present after this many agreeing "
        "(quality-weighted) samples.",
    )
    max_samples: int = Field(
        default=6,
        ge=1,
        le=50,
        title="Samples before unknown",
        description="A track without enough agreement after this many samples is 'unknown'.",
    )
    unknown_sample_weight: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        title="Weight of a no-match sample",
        description="In the vote, a sample that matched nobody counts against the leading "
        "student with this fraction of its quality weight (a sample naming another student "
        "counts fully).",
    )
    debounce_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        title="Debounce window",
        description="One attendance record per student per window of this many seconds.",
    )


class SyncConfig(Section):
    aggregator_url: str | None = Field(
        default=None,
        title="Aggregator URL",
        description="Base URL of the aggregator (e.g. http://10.0.0.5:8000); unset = offline only.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        title="Device API key",
        description="This device's key, printed once by `aggregator devices add`.",
    )
    mqtt_url: SecretStr | None = Field(
        default=None,
        title="MQTT broker URL",
        description="mqtt://user:pass@host:1883 (mqtts:// for TLS); when set, records and "
        "heartbeats go over MQTT. A secret: it carries the broker password.",
    )
    batch_size: int = Field(
        default=200, ge=1, le=1000, title="Batch size", description="Records per upload batch."
    )
    roster_refresh_s: float = Field(
        default=300,
        ge=10,
        le=86400,
        title="Roster refresh period",
        description="Seconds between roster/schedule pulls.",
    )
    heartbeat_s: float = Field(
        default=60,
        ge=5,
        le=3600,
        title="Heartbeat period",
        description="Seconds between heartbeats.",
    )
    backoff_initial_s: float = Field(
        default=1.0,
        ge=0.05,
        le=60,
        title="Retry backoff start",
        description="First wait after a failed upload; doubles per failure (full jitter).",
    )
    backoff_max_s: float = Field(
        default=300,
        ge=1,
        le=3600,
        title="Retry backoff ceiling",
        description="Longest wait between upload attempts, in seconds.",
    )
    request_timeout_s: float = Field(
        default=15,
        ge=1,
        le=300,
        title="HTTP timeout",
        description="Timeout of one HTTP request to the aggregator, in seconds.",
    )
    ack_timeout_s: float = Field(
        default=20,
        ge=1,
        le=600,
        title="MQTT ack timeout",
        description="How long to wait for the aggregator's application-level ack of a batch "
        "sent over MQTT before sending it again (it is counted once either way).",
    )
    idle_poll_s: float = Field(
        default=1.0,
        ge=0.1,
        le=60,
        title="Outbox poll period",
        description="Seconds between outbox checks when everything has been sent.",
    )
    roster_days: int = Field(
        default=2,
        ge=0,
        le=14,
        title="School days cached ahead",
        description="Besides today's, the schedule and rosters of this many next school days "
        "(days with a class in the room, within 31 days) are kept in the encrypted store, so "
        "a device offline across midnight or a weekend still recognises the next class. "
        "Every pull replaces them all (a withdrawn student is gone at the next contact).",
    )
    roster_valid_days: float = Field(
        default=7,
        ge=1,
        le=31,
        title="Cached roster validity",
        description="A cached day's roster the aggregator made more than this many days ago "
        "is not used (a device offline that long recognises nobody from it).",
    )
    early_arrival_s: float = Field(
        default=600,
        ge=0,
        le=3600,
        title="Early arrival window",
        description="A class's roster becomes current this many seconds before it starts "
        "(unless the previous class is still running).",
    )


class WebConfig(Section):
    enabled: bool = Field(default=True, title="Status page", description="Serve the status page.")
    host: str = Field(
        default="127.0.0.1",
        title="Bind address",
        description="Address of the status page (0.0.0.0 on a device).",
    )
    port: int = Field(
        default=8080, ge=1, le=65535, title="Port", description="Port of the status page."
    )
    password_hash: SecretStr | None = Field(
        default=None,
        title="Status page password hash",
        description="Hash set by `appliance web set-password`; no password = page locked.",
    )
    session_ttl_s: int = Field(
        default=43200,
        ge=300,
        le=2592000,
        title="Login session lifetime",
        description="Seconds a status page login stays valid (signed session cookie).",
    )
    cookie_secure: bool = Field(
        default=False,
        title="Secure cookie",
        description="Mark the session cookie Secure; set when the page is served over HTTPS "
        "(e.g. behind a TLS reverse proxy).",
    )
    login_max_failures: int = Field(
        default=5,
        ge=1,
        le=100,
        title="Login failures per minute",
        description="Login attempts allowed per client address per minute (a correct password "
        "clears its address's count); more get HTTP 429 until the minute has passed.",
    )
    login_max_failures_hour: int = Field(
        default=20,
        ge=1,
        le=1000,
        title="Login failures per hour",
        description="Login attempts allowed per client address per hour: the second step of "
        "the back-off (an address that keeps guessing waits up to an hour).",
    )
    login_max_failures_global: int = Field(
        default=30,
        ge=1,
        le=10000,
        title="Login attempts per minute, all addresses",
        description="Password checks allowed per minute from all client addresses together: a "
        "ceiling against guessing from many addresses; more get HTTP 429 for up to a minute.",
    )
    trusted_proxies: Networks = Field(
        default="",
        max_length=1000,
        pattern=r"^[0-9A-Fa-f.:/, ]*$",
        title="Trusted reverse proxies",
        description="Comma-separated addresses or networks (CIDR) of reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto headers are believed; empty = none: the client "
        "address is the connection's (the login limit counts per client address).",
    )
    metrics_public: bool = Field(
        default=True,
        title="Open /metrics",
        description="Serve /metrics without a login (counts only, no personal data); "
        "false = a login or the device API key as a Bearer token is required.",
    )
    refresh_s: float = Field(
        default=1.0,
        ge=0.2,
        le=60,
        title="Live update period",
        description="Seconds between status updates pushed to an open status page (SSE).",
    )

    def trusted_proxy_list(self) -> list[str]:
        return network_list(self.trusted_proxies)


class AlertsConfig(Section):
    enabled: bool = Field(
        default=True,
        title="Alerts",
        description="Watch camera, temperature, disk and outbox; send alerts as events.",
    )
    period_s: float = Field(
        default=10.0,
        ge=0.05,
        le=3600,
        title="Check period",
        description="Seconds between alert checks.",
    )
    camera_offline_s: float = Field(
        default=60.0,
        ge=0,
        le=86400,
        title="Camera offline after",
        description="Seconds the camera may be not ok before a camera_offline alert.",
    )
    cpu_temp_max_c: float = Field(
        default=70.0,
        ge=30,
        le=110,
        title="CPU temperature alert",
        description="CPU temperature (deg C) above which a cpu_temperature_high alert is sent; "
        "health is degraded above it.",
    )
    cpu_temp_critical_c: float = Field(
        default=80.0,
        ge=30,
        le=120,
        title="CPU temperature critical",
        description="CPU temperature (deg C) at which health is unhealthy (a Pi throttles "
        "at 80-85).",
    )
    cpu_temp_clear_c: float = Field(
        default=5.0,
        ge=0,
        le=30,
        title="Temperature hysteresis",
        description="The temperature alert re-arms once it is this many degrees below the limit.",
    )
    disk_max_percent: float = Field(
        default=90.0,
        ge=10,
        le=100,
        title="Disk usage alert",
        description="Usage (%) of the data directory's file system above which a "
        "disk_almost_full alert is sent; health is degraded above it.",
    )
    disk_critical_percent: float = Field(
        default=98.0,
        ge=10,
        le=100,
        title="Disk usage critical",
        description="Usage (%) at which disk health is unhealthy.",
    )
    disk_min_free_mb: int = Field(
        default=200,
        ge=0,
        le=1_000_000,
        title="Disk free space minimum",
        description="Free space (MB) of the data directory's file system below which disk "
        "health is unhealthy, whatever the percentage (a small card fills at a high %).",
    )
    disk_clear_percent: float = Field(
        default=2.0,
        ge=0,
        le=50,
        title="Disk hysteresis",
        description="The disk alert re-arms once usage is this many points below the limit.",
    )
    outbox_max_age_s: float = Field(
        default=600.0,
        ge=10,
        le=604800,
        title="Outbox age alert",
        description="Seconds the oldest unsent record or event may wait before an "
        "outbox_stale alert.",
    )


class ClockConfig(Section):
    trust_ntp: bool = Field(
        default=True,
        title="Trust NTP",
        description="The clock is trusted once NTP has synchronised it (timedatectl's "
        "NTPSynchronized, or systemd-timesyncd's flag file). Off: only the aggregator's time "
        "(authenticated with the device key) is trusted (appliance/clock.py).",
    )
    trust_aggregator: bool = Field(
        default=True,
        title="Trust the aggregator's time",
        description="While NTP has not synchronised the clock, take the time from the Date of "
        "the aggregator's authenticated answers (round trip at most 3 s; error about 1-2 s).",
    )
    trust_rtc: bool = Field(
        default=True,
        title="Trust a real-time clock",
        description="After a reboot without network, trust a real-time clock "
        "(/sys/class/rtc/rtc0) if it is not behind the last trusted time plus the time since "
        "boot (a Pi 4 has none; a Pi 5's needs its battery).",
    )
    untrusted: Literal["record-flagged", "record-nothing"] = Field(
        default="record-flagged",
        title="With an untrusted clock",
        description="What the device does while its clock is not trusted (after a reboot "
        "without NTP, aggregator or RTC). 'record-flagged': recognise against the cached "
        "rosters of every class from the last trusted time to untrusted_horizon_h later and "
        "record without a class, flagged clock_synced=false (the aggregator places each record "
        "in time once this boot gets a trusted time, and picks the class). 'record-nothing': "
        "recognise nobody until the clock is trusted.",
    )
    untrusted_horizon_h: float = Field(
        default=24,
        ge=1,
        le=168,
        title="Untrusted-clock horizon",
        description="With an untrusted clock: how long after the last trusted time a class may "
        "be running (the longest outage the device assumes), in hours.",
    )


class StoreConfig(Section):
    encryption: Literal["aggregator", "off"] = Field(
        default="aggregator",
        title="Store encryption",
        description="'aggregator': the store (outbox, roster cache) is encrypted with SQLCipher "
        "under a key the aggregator hands out at start (POST /api/v1/store-key) and the "
        "device keeps in memory only, so a copy of the SD card reads as noise; after a "
        "restart the device records nothing until the aggregator answers, unless an offline "
        "unlock is allowed (store.board_unlock_days, store.offline_unlock_days; "
        "docs/PRIVACY.md). "
        "Needs sync.aggregator_url; without one the store stays unencrypted and /health says "
        "so. 'off': unencrypted.",
    )
    board_key: Literal["otp", "off"] = Field(
        default="otp",
        title="Board key",
        description="'otp': the Raspberry Pi 4/5 customer OTP private key (programmed at "
        "flash time with rpi-otp-private-key, read through the firmware mailbox /dev/vcio) "
        "seals a copy of the store key on the card that only this board opens, for an "
        "offline unlock after a restart (store.board_unlock_days). A board without one (not a "
        "Pi 4/5, never programmed, qemu) has no board key: store.offline_unlock_days applies. "
        "'off': never use it.",
    )
    board_key_file: Path | None = Field(
        default=None,
        title="Board key file",
        description="Read the board key from this file (64 hex digits, rpi-otp-private-key's "
        "output format) instead of the firmware mailbox: for tests, and for boards whose "
        "secret lives off the SD card. A file on the SD card itself protects nothing.",
    )
    board_unlock_days: float = Field(
        default=7,
        ge=0,
        le=31,
        title="Offline unlock with the board key (days)",
        description="With a board key: after a restart while the aggregator cannot be "
        "reached, the store is opened with the board-sealed key for at most this many days "
        "after the last answer of the aggregator (rosters are not used beyond "
        "sync.roster_valid_days anyway). 0 = wait for the aggregator, as without one.",
    )
    offline_unlock_days: float = Field(
        default=0,
        ge=0,
        le=31,
        title="Offline unlock without a board key (days)",
        description="Without a board key (store.board_key): keep the store key on the card "
        "for an offline unlock for at most this many days after the last answer of the "
        "aggregator. A copy of the card taken while it is there opens the store, whatever "
        "the date (docs/PRIVACY.md): choose it at flash time, with the risk in the DPIA. "
        "0 (default) = no key on the card: a restarted device waits for the aggregator.",
    )
    keep_sent_days: float = Field(
        default=30,
        ge=1,
        le=3650,
        title="Keep sent records",
        description="Records and events acknowledged by the aggregator are deleted from the "
        "device this many days after they were sent (unsent and parked ones are never "
        "deleted); cached schedules of older days go too.",
    )
    keep_parked_days: float = Field(
        default=90,
        ge=1,
        le=3650,
        title="Keep parked records",
        description="Records and events the aggregator refused (parked with the reason, "
        "never sent) are deleted this many days after they were made (the journal names "
        "each one with the reason when it is parked).",
    )


class EventsConfig(Section):
    enabled: bool = Field(
        default=True,
        title="Classroom events",
        description="Occupancy, attention and unknown-face alerts from the camera, sent as "
        "events.",
    )
    room_capacity: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        title="Room capacity",
        description="Seats in the room: occupancy events then carry free seats and the "
        "occupied share (unset: count only).",
    )
    count_period_s: float = Field(
        default=5.0,
        ge=0.1,
        le=600,
        title="Count period",
        description="Seconds between two occupancy/attention counts (a tiled detection pass "
        "over the frame when count_tiles > 0).",
    )
    count_tiles: int = Field(
        default=3,
        ge=0,
        le=4,
        title="Count tiles",
        description="Tiles per row of the counting pass, for the small faces of a whole-room "
        "view (20-30 px faces in 480x270 need 2-3); 0 = count the pipeline's own detections.",
    )
    count_min_face_px: int = Field(
        default=10,
        ge=6,
        le=1000,
        title="Smallest counted face",
        description="Faces narrower than this many pixels are not counted.",
    )
    count_score_threshold: float = Field(
        default=0.6,
        ge=0.05,
        le=0.99,
        title="Count score threshold",
        description="Minimum detector confidence of a counted face.",
    )
    window_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        title="Smoothing window",
        description="Occupancy is the median, attention the mean, of the counts of this many "
        "seconds.",
    )
    min_interval_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        title="Minimum event interval",
        description="At most one occupancy and one attention event per this many seconds "
        "(a change waits until then).",
    )
    max_interval_s: float = Field(
        default=300.0,
        ge=10,
        le=86400,
        title="Maximum event interval",
        description="An occupancy and an attention event at least this often during a class, "
        "even without a change.",
    )
    attention_max_yaw_deg: float = Field(
        default=30.0,
        ge=5,
        le=90,
        title="Facing front: yaw",
        description="A face turned further sideways than this is not facing the front.",
    )
    attention_max_pitch_deg: float = Field(
        default=25.0,
        ge=5,
        le=90,
        title="Facing front: pitch",
        description="A face bent further up or down than this is not facing the front.",
    )
    attention_change: float = Field(
        default=0.1,
        ge=0.01,
        le=1,
        title="Attention change",
        description="An attention event is sent when the facing-front share moved this much.",
    )
    attention_per_student: bool = Field(
        default=False,
        title="Attention per student",
        description="Also send facing-front per recognised student. Personal data about "
        "minors: enable only where the school has a legal basis for it.",
    )
    unknown_alert: bool = Field(
        default=True,
        title="Unknown-face alert",
        description="Alert when a face not in the class's roster is seen during a class.",
    )
    unknown_cooldown_s: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        title="Unknown-face cooldown",
        description="Seconds after an unknown-face alert before the room's next one of the "
        "same severity.",
    )
    unknown_several: int = Field(
        default=3,
        ge=2,
        le=100,
        title="Several unknown faces",
        description="This many unknown faces within unknown_window_s raise a critical alert.",
    )
    unknown_window_s: float = Field(
        default=120.0,
        ge=1,
        le=3600,
        title="Unknown-face window",
        description="Seconds over which unknown faces are counted together.",
    )


class UnknownFacesConfig(Section):
    enabled: bool = Field(
        default=False,
        title="Report unknown faces",
        description="Send a small crop and the descriptor of each unrecognised track to the "
        "aggregator for walk-in enrolment in its console (off by default, for privacy: these "
        "are photos of people who are not enrolled). Needs sync.aggregator_url and the "
        "aggregator's unknown_faces_enabled. Crops are never written to the device's disk.",
    )
    crop_px: int = Field(
        default=96,
        ge=32,
        le=256,
        title="Crop size",
        description="Longest side, in pixels, of the face crop sent.",
    )
    queue_size: int = Field(
        default=50,
        ge=1,
        le=1000,
        title="Queue size",
        description="Unknown faces waiting to be sent; more are dropped (and counted), as "
        "are faces that cannot be sent (offline): nothing is kept.",
    )


class UpdateConfig(Section):
    """How releases are installed on this device (`appliance update`, make deploy)."""

    enabled: bool = Field(
        default=True,
        title="Pull updates",
        description="Fetch the release the aggregator names for this device (signed, staged "
        "rollout; docs/OPERATIONS.md 6.10). make deploy works either way.",
    )
    prefix: Path = Field(
        default=Path("/opt/classroom-attendance"),
        title="Install prefix",
        description="Where releases/, deps/, bundles/, update/ and the current symlink live.",
    )
    keys_dir: Path = Field(
        default=Path("/etc/classroom-attendance/release-keys"),
        title="Trusted release keys",
        description="Directory of ed25519 public keys (*.pub, PEM) a release must be signed "
        "with (put there by make image / make flash RELEASE_PUBKEY=...). Pulled releases are "
        "always checked; make deploy checks a signed bundle and, with --unsigned, takes an "
        "unsigned one (the operator is root on the device anyway).",
    )
    trial_s: float = Field(
        default=180,
        ge=5,
        le=3600,
        title="Trial time",
        description="A new release must report healthy (its version, camera frames, store "
        "open, aggregator reached if configured) within this many seconds of the switch, or "
        "the device goes back to the previous release by itself.",
    )
    max_boots_on_trial: int = Field(
        default=2,
        ge=1,
        le=10,
        title="Boots on trial",
        description="Reboots during a trial before the device reverts without waiting.",
    )
    restart_command: str = Field(
        default="systemctl restart classroom-appliance.service",
        max_length=500,
        title="Restart command",
        description="Shell command that restarts the appliance on `current` (tests replace "
        "systemd with a script).",
    )
    confirm_command: str = Field(
        default="systemctl start --no-block classroom-release-confirm.service",
        max_length=500,
        title="Start the trial",
        description="How `apply --detach` (make deploy) hands the trial to a process that "
        "outlives the SSH session. Empty: a detached child process.",
    )
    units_dir: Path | None = Field(
        default=Path("/etc/systemd/system"),
        title="Unit directory",
        description="Where the release's device units are installed (unset: not installed).",
    )
    systemctl: str = Field(
        default="systemctl",
        max_length=200,
        title="systemctl",
        description="systemctl command for daemon-reload/enable after units changed (empty: "
        "none, e.g. on a test host without systemd).",
    )
    min_free_mb: int = Field(
        default=200,
        ge=0,
        le=100_000,
        title="Free space to keep",
        description="A download or install that would leave less free space on the install "
        "file system is refused (reported, nothing switched).",
    )
    max_bytes_per_s: int = Field(
        default=1_000_000,
        ge=10_000,
        le=1_000_000_000,
        title="Download bandwidth",
        description="Upper bound of a release download (bytes/s); the rollout may set a "
        "lower one. A school's uplink is shared.",
    )
    request_file: Path | None = Field(
        default=Path("/var/lib/classroom-attendance/update.requested"),
        title="Update request file",
        description="When the heartbeat reply names a release, the appliance touches this "
        "file and classroom-update.path starts `appliance update check` as root (the "
        "appliance runs unprivileged). Empty (\"\"): a detached `appliance update check` "
        "child instead (a host without systemd).",
    )

    @field_validator("request_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    reboot_command: str = Field(
        default="systemctl reboot",
        max_length=500,
        title="Reboot command",
        description="What `appliance update reboot-if-needed` runs when a security update "
        "asked for a reboot and no class is in session or about to start.",
    )
    reboot_required_file: Path = Field(
        default=Path("/run/reboot-required"),
        title="Reboot-required flag",
        description="The file unattended-upgrades (Debian's security suite) leaves when an "
        "installed update needs a reboot.",
    )
    check_interval_s: float = Field(
        default=900,
        ge=1,
        le=86_400,
        title="Check interval",
        description="`appliance update watch` asks the aggregator this often (a host "
        "without systemd; on a device classroom-update.timer runs the check every 15 min, "
        "and the heartbeat reply triggers it at once).",
    )


class ApplianceSettings(TomlSettings):
    """Settings of one appliance."""

    model_config = SettingsConfigDict(
        env_prefix="APPLIANCE_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    device: DeviceConfig = Field(
        default_factory=DeviceConfig, description="Identity of this device."
    )
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Data and model locations.")
    camera: CameraConfig = Field(default_factory=CameraConfig, description="Frame source.")
    detector: DetectorConfig = Field(default_factory=DetectorConfig, description="Face detection.")
    recognition: RecognitionConfig = Field(
        default_factory=RecognitionConfig, description="Roster matching."
    )
    decision: DecisionConfig = Field(
        default_factory=DecisionConfig, description="Voting and debounce."
    )
    store: StoreConfig = Field(default_factory=StoreConfig, description="Local SQLite store.")
    clock: ClockConfig = Field(default_factory=ClockConfig,
                               description="When to trust the device's clock.")
    sync: SyncConfig = Field(default_factory=SyncConfig, description="Link to the aggregator.")
    web: WebConfig = Field(default_factory=WebConfig, description="Local status page.")
    alerts: AlertsConfig = Field(
        default_factory=AlertsConfig, description="Device alerts sent as events."
    )
    events: EventsConfig = Field(
        default_factory=EventsConfig,
        description="Classroom events: occupancy, attention, unknown faces.",
    )
    unknown_faces: UnknownFacesConfig = Field(
        default_factory=UnknownFacesConfig,
        description="Unknown-face crops for walk-in enrolment (off by default).",
    )
    update: UpdateConfig = Field(
        default_factory=UpdateConfig,
        description="Releases: pulled updates, make deploy, trial and revert.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        title="Log level",
        description="Logs go to stdout (journald on a device).",
    )


def load(path: Path | str | None = None, **overrides: object) -> ApplianceSettings:
    """Load the appliance settings; see :func:`cloud_sync.settings.load_settings`."""
    return load_settings(ApplianceSettings, path, env_var="APPLIANCE_CONFIG", **overrides)


EXAMPLE_HEADER = """\
Appliance configuration (generated by `appliance config example`; every key is documented
here with its bounds, and every key left commented out takes the default shown).
Environment variables override this file: APPLIANCE_<SECTION>__<KEY>,
e.g. APPLIANCE_CAMERA__SOURCE=/dev/video0. `appliance config show` prints the effective values.
"""

EXAMPLE_VALUES: dict[str, object] = {
    "device.device_id": "pi-lab301",
    "device.room_id": "LAB-301",
    "camera.source": "0",
}


def example() -> str:
    """The documented example file (``config/appliance.example.toml``)."""
    return example_toml(
        ApplianceSettings, EXAMPLE_HEADER, EXAMPLE_VALUES,
        shown_defaults={
            "paths.model_dir": "(models/files in a checkout; an installed release's models/)"},
    )
