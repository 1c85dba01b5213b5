"""Prometheus metrics of the aggregator (one registry, served at GET /metrics).

Under ``serve --workers N`` prometheus_client runs in multiprocess mode (``serve`` sets
PROMETHEUS_MULTIPROC_DIR): counters and histograms are summed over the workers, the gauges
below say how (``multiprocess_mode``; ignored with one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RECORDS = Counter(
    "aggregator_attendance_records_total", "Attendance records by ingest outcome.",
    ["result"], registry=REGISTRY,
)
HEARTBEATS = Counter(
    "aggregator_heartbeats_total", "Heartbeats stored.", registry=REGISTRY
)
EVENTS = Counter(
    "aggregator_events_total", "Device events received, by kind.", ["kind"], registry=REGISTRY
)
DEAD_LETTERS = Counter(
    "aggregator_dead_letters_total", "Messages kept as dead letters.", registry=REGISTRY
)
REQUESTS = Counter(
    "aggregator_http_requests_total", "HTTP requests by route and status.",
    ["method", "route", "status"], registry=REGISTRY,
)
LATENCY = Histogram(
    "aggregator_http_request_seconds", "HTTP request latency by route.", ["route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "aggregator_rate_limited_total", "Device requests answered 429.", registry=REGISTRY
)
ENROLLMENTS = Counter(
    "aggregator_face_enrollments_total", "Enrollment photos by outcome.", ["result"],
    registry=REGISTRY,
)
MQTT_CONNECTED = Gauge(
    "aggregator_mqtt_bridge_connected", "MQTT bridges connected (one per worker).",
    registry=REGISTRY, multiprocess_mode="livesum",
)
WS_CLIENTS = Gauge(
    "aggregator_ws_clients", "Clients connected to /ws/events.", registry=REGISTRY,
    multiprocess_mode="livesum",
)
WS_DROPPED = Counter(
    "aggregator_ws_dropped_total", "/ws/events clients dropped for falling behind.",
    registry=REGISTRY,
)
EVENTS_PRUNED = Counter(
    "aggregator_events_pruned_total", "Events deleted after events_keep_days.", registry=REGISTRY
)
DISK_FREE = Gauge(
    "aggregator_disk_free_bytes", "Free bytes where the data lives (SQLite file system, else "
    "data_dir), as of the last /health; -1 if unreadable.", registry=REGISTRY,
    multiprocess_mode="mostrecent",
)
