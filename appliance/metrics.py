"""Prometheus metrics of the appliance, all under the ``attendance_`` prefix.

Defined once here; the pipeline, the sync agent and the status page update them, and
``GET /metrics`` on the status page exports them. Documented in docs/STATUS_PAGE.md.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "attendance_"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

FRAMES_PROCESSED = Counter(
    f"{PREFIX}frames_processed", "Frames that went through detection."
)
FRAMES_DROPPED = Counter(
    f"{PREFIX}frames_dropped", "Live frames skipped because a newer one was available."
)
DETECTION_SECONDS = Histogram(
    f"{PREFIX}detection_seconds", "Face detection latency per frame.", buckets=_LATENCY_BUCKETS
)
EMBEDDING_SECONDS = Histogram(
    f"{PREFIX}embedding_seconds", "Face descriptor latency per face.", buckets=_LATENCY_BUCKETS
)
RECOGNITIONS = Counter(
    f"{PREFIX}recognitions", "Decided tracks by result.", ["result"]  # present | unknown
)
ATTENDANCE_RECORDS = Counter(
    f"{PREFIX}attendance_records", "Attendance records written to the outbox."
)
OUTBOX_DEPTH = Gauge(f"{PREFIX}outbox_depth", "Records and events not yet acknowledged.")
SYNC_RESULTS = Counter(
    f"{PREFIX}sync", "Uploads to the aggregator by result.", ["result"]  # success | failure
)
FPS = Gauge(f"{PREFIX}fps", "Frames processed per second (recent average).")
CPU_TEMPERATURE = Gauge(f"{PREFIX}cpu_temperature_celsius", "CPU temperature.")
CAMERA_UP = Gauge(f"{PREFIX}camera_up", "1 when the camera delivers frames, else 0.")
WEB_LOGINS = Counter(
    f"{PREFIX}web_logins", "Status page login attempts by result.", ["result"]
)  # ok | wrong | rate_limited | not_configured
ALERTS_RAISED = Counter(
    f"{PREFIX}alerts", "Alerts raised (events written to the outbox) by kind.", ["kind"]
)
CLASSROOM_EVENTS = Counter(
    f"{PREFIX}classroom_events",
    "Occupancy, attention and unknown-face events written to the outbox, by kind.", ["kind"]
)
# placement check (appliance/placement.py): each person who walked past counts once, at the
# largest width their face reached
FACE_SIZE = Histogram(
    f"{PREFIX}face_size_pixels", "Largest face width of each ended track, in frame pixels.",
    buckets=(24, 32, 40, 50, 60, 80, 120, 200, 300),
)
FACES_BY_SIZE = Counter(
    f"{PREFIX}faces_by_size", "Ended tracks by face size band and whether recognised.",
    ["size", "recognised"],
)
PLACEMENT_OK = Gauge(
    f"{PREFIX}placement_ok",
    "1 when the faces of the last class were big enough to recognise, 0 when not, -1 before "
    "enough faces were seen.",
)
PLACEMENT_MEDIAN_FACE = Gauge(
    f"{PREFIX}placement_median_face_pixels", "Median face width of the last class (0: none).",
)
