"""Real components for the sync tests: a Mosquitto of our own (restartable, with the repo's ACL
file and example config), the aggregator (`aggregator serve` subprocess on a temp SQLite DB),
and the appliance side (the real Store and SyncAgent, or `python -m appliance.sync`)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.conftest import REPO

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = Path("/usr/bin/mosquitto_passwd")
VENV_BIN = Path(sys.executable).parent
SITE = "main"
ROOM = "LAB-301"
OTHER_ROOM = "LAB-302"
DEVICE = "pi-lab301"
OTHER_DEVICE = "pi-lab302"
STUDENTS = [f"S{i:03d}" for i in range(1, 51)]
ENROLLED = STUDENTS[:10]


def _midday_zone() -> str:
    """A fixed-offset IANA zone where it is about noon now, so that a class from an hour ago
    to an hour from now never crosses midnight, whenever the tests run."""
    offset = 12 - datetime.now(UTC).hour  # -11 .. +12
    return f"Etc/GMT-{offset}" if offset > 0 else f"Etc/GMT+{-offset}"


ROOM_TZ = _midday_zone()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(
    cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# --- Mosquitto ---------------------------------------------------------------------------------
# Where the test devices are registered (their ACL blocks: own site/room/device only).
PLACES = {DEVICE: (SITE, ROOM), OTHER_DEVICE: (SITE, OTHER_ROOM), "pi-local": ("main", "LAB-301")}


class Broker:
    """A Mosquitto built from config/mosquitto/mosquitto.conf on free ports: the devices'
    listener with the ACL `aggregator mqtt acl` writes (config/mosquitto/acl plus a block per
    device user in PLACES) and every user but `aggregator` in its password file; the bridges'
    listener with bridge.acl and only `aggregator` in its password file."""

    def __init__(self, workdir: Path, users: Iterable[str]) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.bridge_port = free_port()  # the aggregator bridges' listener (1884)
        self.passwords = {user: secrets.token_urlsafe(12) for user in users}
        passwd, bridge_passwd = self.dir / "passwd", self.dir / "bridge.passwd"
        text = (REPO / "config/mosquitto/mosquitto.conf").read_text()
        own_bridge_users = "classroom-bridge.passwd" in text  # else one file for every user
        logins = {**self.passwords}
        logins.setdefault("aggregator", secrets.token_urlsafe(12))  # the file must exist
        for user, password in logins.items():
            target = bridge_passwd if user == "aggregator" and own_bridge_users else passwd
            args = [str(MOSQUITTO_PASSWD), "-b"] + ([] if target.exists() else ["-c"])
            subprocess.run([*args, str(target), user, password], check=True,
                           capture_output=True)
        if not passwd.exists():
            subprocess.run([str(MOSQUITTO_PASSWD), "-b", "-c", str(passwd), "nobody-x",
                            secrets.token_urlsafe(12)], check=True, capture_output=True)
        persist = self.dir / "persist"
        persist.mkdir(exist_ok=True)
        text = re.sub(r"(?m)^listener 1883\b.*$", f"listener {self.port} 127.0.0.1", text)
        text = re.sub(r"(?m)^listener 1884\b.*$", f"listener {self.bridge_port} 127.0.0.1",
                      text)
        text = re.sub(r"(?m)^password_file .*classroom-bridge\.passwd$",
                      f"password_file {bridge_passwd}", text)
        text = re.sub(r"(?m)^password_file .*classroom\.passwd$", f"password_file {passwd}",
                      text)
        from cloud_sync.aggregator import mqtt_acl

        acl, bridge_acl = self.dir / "acl", self.dir / "bridge.acl"
        acl.write_text(mqtt_acl.render(PLACES[u] + (u,) for u in self.passwords if u in PLACES))
        bridge_acl.write_text(getattr(mqtt_acl, "BRIDGE", ""))
        text = re.sub(r"(?m)^acl_file .*classroom-bridge\.acl$", f"acl_file {bridge_acl}",
                      text)
        text = re.sub(r"(?m)^acl_file .*classroom\.acl$", f"acl_file {acl}", text)
        text = re.sub(r"(?m)^persistence_location .*$", f"persistence_location {persist}/", text)
        text += f"\nuser root\nlog_dest file {self.dir / 'mosquitto.log'}\nlog_type all\n"
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def port_of(self, user: str) -> int:
        """The aggregator's bridges use their own listener (config/mosquitto/mosquitto.conf)."""
        return self.bridge_port if user == "aggregator" else self.port

    def url(self, user: str) -> str:
        return f"mqtt://{user}:{self.passwords[user]}@127.0.0.1:{self.port_of(user)}"

    def start(self) -> None:
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: port_open(self.port) and port_open(self.bridge_port), 10,
                       "mosquitto to listen")
        except AssertionError:
            self.proc.kill()
            raise AssertionError(f"mosquitto did not start: {self.proc.stderr.read()!r}") from None

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(10)
        self.proc = None


# --- aggregator --------------------------------------------------------------------------------
class Aggregator:
    """The real aggregator on a temp SQLite database (or ``db_url``: the SQL helpers below
    are SQLite only); the server runs as a subprocess."""

    def __init__(self, workdir: Path, db_url: str | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "aggregator.db"
        self.db_url = db_url or f"sqlite:///{self.db_path}"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "aggregator.log"

    def seed(self) -> dict[str, str]:
        """Migrate; create two rooms, 50 students, course CS101 (10 enrolled students with a
        face embedding each) running in LAB-301 from an hour ago to an hour from now, one
        device per room and an admin token; returns {device_id: api_key, "admin": token}."""
        from zoneinfo import ZoneInfo

        import numpy as np

        from cloud_sync.aggregator.db.migrate import upgrade
        from cloud_sync.aggregator.db.models import (
            Course,
            Enrollment,
            FaceEmbedding,
            Room,
            Schedule,
            Student,
        )
        from cloud_sync.aggregator.db.session import make_engine, make_session_factory
        from cloud_sync.aggregator.services.devices import add_device, create_admin_token
        from cloud_sync.protocol import EMBEDDER_IDS

        upgrade(self.db_url)
        engine = make_engine(self.db_url)
        now = datetime.now(UTC)
        local = now.astimezone(ZoneInfo(ROOM_TZ))
        rng = np.random.default_rng(7)
        keys: dict[str, str] = {}
        try:
            factory = make_session_factory(engine)
            with factory() as session:
                for room in (ROOM, OTHER_ROOM):
                    session.add(Room(id=room, name=room, site=SITE, timezone=ROOM_TZ,
                                     created_at=now))
                for sid in STUDENTS:
                    session.add(Student(id=sid, name=f"Student {sid}", created_at=now,
                                        consent="granted", consent_at=now,
                                        consent_by="tests"))
                session.add(Course(id="CS101", name="Intro to CS", created_at=now))
                session.flush()
                for sid in ENROLLED:
                    session.add(Enrollment(student_id=sid, course_id="CS101", created_at=now))
                for sid in STUDENTS:
                    vec = rng.normal(size=128).astype("<f4")
                    vec /= np.linalg.norm(vec) * 2
                    session.add(FaceEmbedding(student_id=sid, vector=vec.tobytes(),
                                              embedder=EMBEDDER_IDS["sface"],
                                              source="test", quality=0.9, created_at=now))
                session.add(Schedule(
                    course_id="CS101", room_id=ROOM, weekday=local.weekday(),
                    start_time=(local - timedelta(hours=1)).time().replace(microsecond=0),
                    end_time=(local + timedelta(hours=1)).time().replace(microsecond=0),
                ))
                session.commit()
            with factory() as session:
                keys[DEVICE] = add_device(session, ROOM, DEVICE)[1]
            with factory() as session:
                keys[OTHER_DEVICE] = add_device(session, OTHER_ROOM, OTHER_DEVICE)[1]
            with factory() as session:
                keys["admin"] = create_admin_token(session, "tests")[1]
        finally:
            engine.dispose()
        return keys

    def start(self, mqtt_url: str | None = None, sqlite_synchronous: str = "NORMAL",
              extra_env: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
        env.update({
            "AGGREGATOR_DATABASE_URL": self.db_url,
            "AGGREGATOR_DATA_DIR": str(self.dir / "data"),
            "AGGREGATOR_RATE_LIMIT_PER_MIN": "100000",
            "AGGREGATOR_SQLITE_SYNCHRONOUS": sqlite_synchronous,
        })
        if mqtt_url:
            env["AGGREGATOR_MQTT_URL"] = mqtt_url
        env.update(extra_env or {})
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "aggregator"), "serve", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, 60,
                       "the aggregator to listen", interval_s=0.1)
        finally:
            if self.proc.poll() is not None:
                raise AssertionError(f"aggregator exited: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def attendance_keys(self) -> list[str]:
        """Every attendance row's key (a key counted twice would appear twice)."""
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(str(self.db_path), timeout=30)
        try:
            return [norm_key(str(r[0])) for r in conn.execute("SELECT key FROM attendance")]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def execute(self, sql: str, *args: object) -> None:
        conn = sqlite3.connect(str(self.db_path), timeout=30)
        try:
            with conn:
                conn.execute(sql, args)
        finally:
            conn.close()

    def scalar(self, sql: str, *args: object) -> Any:
        conn = sqlite3.connect(str(self.db_path), timeout=30)
        try:
            row = conn.execute(sql, args).fetchone()
        finally:
            conn.close()
        return None if row is None else row[0]


@contextlib.contextmanager
def run_bridge(broker: Broker, agg: Aggregator, **overrides: object) -> Iterator[Any]:
    """The aggregator's MQTT bridge, in this process, on ``broker`` and ``agg``'s database;
    connected and subscribed when it is yielded, stopped at the end."""
    from cloud_sync.aggregator.config import load
    from cloud_sync.aggregator.db.session import make_engine, make_session_factory
    from cloud_sync.aggregator.mqtt_bridge import MqttBridge

    settings = load(None, database_url=agg.db_url, mqtt_url=broker.url("aggregator"),
                    **overrides)
    engine = make_engine(agg.db_url)
    b = MqttBridge(settings, make_session_factory(engine))
    b.start()
    try:
        wait_until(lambda: b.state == "connected", 10, "the bridge to connect")
        time.sleep(0.2)  # subscriptions
        yield b
    finally:
        b.stop()
        engine.dispose()


def norm_key(key: str) -> str:
    return str(uuid.UUID(key))


# --- appliance side ----------------------------------------------------------------------------
def make_records(n: int, *, device: str = DEVICE, room: str = ROOM,
                 students: list[str] | None = None) -> list[Any]:
    from cloud_sync.protocol import AttendanceRecord

    students = students or STUDENTS
    base = datetime.now(UTC) - timedelta(minutes=30)
    return [
        AttendanceRecord(
            key=uuid.uuid4(), student_id=students[i % len(students)], course_id="CS101",
            room_id=room, device_id=device, seen_at=base + timedelta(milliseconds=i),
            confidence=0.9, distance=0.3, clock_synced=True,
        )
        for i in range(n)
    ]


def fill_store(store: Any, records: list[Any]) -> None:
    for record in records:
        store.add_record(record)


def appliance_overrides(data_dir: Path, *, aggregator_url: str | None, api_key: str | None,
                        mqtt_url: str | None = None, device: str = DEVICE, room: str = ROOM,
                        **sync: Any) -> dict[str, Any]:
    sync_cfg: dict[str, Any] = {
        "aggregator_url": aggregator_url, "api_key": api_key, "mqtt_url": mqtt_url,
        "batch_size": 200, "backoff_initial_s": 0.1, "backoff_max_s": 1.0,
        "ack_timeout_s": 5, "request_timeout_s": 5, "idle_poll_s": 0.2, "heartbeat_s": 5,
        "roster_refresh_s": 30,
    }
    sync_cfg.update(sync)
    return {
        "device": {"device_id": device, "room_id": room, "site": SITE, "timezone": ROOM_TZ},
        "paths": {"data_dir": str(data_dir)},
        "sync": sync_cfg,
        "web": {"enabled": False},
    }


def appliance_settings(data_dir: Path, **kwargs: Any) -> Any:
    from appliance.config import load

    return load(None, **appliance_overrides(data_dir, **kwargs))


def start_pushed_agent(agg: Aggregator, broker: Any, keys: dict[str, str],
                       data_dir: Path) -> tuple[Any, Any, Any]:
    """(store, settings, agent): the device's real Store and SyncAgent on MQTT with the hourly
    poll (a roster change can only arrive by the pushed notice), started, its first schedule
    pulled and MQTT connected. The caller stops the agent and closes the store."""
    from appliance.store import Store
    from appliance.sync import SyncAgent

    store = Store(data_dir / "appliance.db")
    settings = appliance_settings(data_dir, aggregator_url=agg.base_url, api_key=keys[DEVICE],
                                  mqtt_url=broker.url(DEVICE), roster_refresh_s=3600)
    agent = SyncAgent(settings, store)
    agent.start()
    wait_until(lambda: agent.stats.schedule_updates >= 1 and agent.status().mqtt_connected,
               30, "first pull and MQTT connection")
    return store, settings, agent


def device_store_key(agg: Aggregator, api_key: str) -> bytes:
    """The device's store key, asked of the aggregator as the device does at start (an agent
    process with an aggregator encrypts the store with it: docs/PRIVACY.md)."""
    import base64

    import httpx

    answer = httpx.post(f"{agg.base_url}/api/v1/store-key", timeout=10,
                        headers={"Authorization": f"Bearer {api_key}"})
    answer.raise_for_status()
    return base64.b64decode(answer.json()["key"])


def write_appliance_toml(path: Path, overrides: dict[str, Any]) -> None:
    lines: list[str] = []
    for section, values in overrides.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")


def start_agent_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "appliance.sync", "--config", str(config)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
        )
