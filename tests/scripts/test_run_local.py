"""`make run` (scripts/run-local.sh): the local aggregator and an appliance syncing with it over
HTTP; the device key made on first run is kept in data/local-sync.env (600) and reused, never
printed; Ctrl-C (SIGINT to the process group) stops both."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, require
from tests.support.harness import free_port, wait_until

pytestmark = pytest.mark.slow


def _workers(db: Path) -> list[str]:
    """The recording workers alive at the local aggregator (rows of job_workers)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM job_workers")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _heartbeats(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(str(db), timeout=30)
    try:
        return int(conn.execute(
            "SELECT count(*) FROM heartbeats WHERE device_id = 'pi-local'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _run(root: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(["bash", "scripts/run-local.sh"], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _ctrl_c(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGINT to the group, as Ctrl-C does. Stopping joins each component with its own bound
    (up to ~10 s each); on a loaded 2-core machine that can add up, hence 90 s."""
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        left = subprocess.run(["ps", "-o", "pid=,stat=,wchan=,cmd=", "-g", str(proc.pid)],
                              capture_output=True, text=True).stdout
        # both servers dump their threads' stacks on SIGUSR1 (faulthandler), into the log
        for line in left.splitlines():
            pid, cmd = line.split()[0], line.split(maxsplit=3)[-1]
            if "appliance run" in cmd or "aggregator serve" in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGUSR1)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)  # never leave an appliance running past the test
        proc.wait(10)
        tail = log.read_text()[-6000:]
        raise AssertionError(f"make run did not stop in 90 s after Ctrl-C; still running:\n"
                             f"{left}\nlog:\n{tail}") from None
    print(f"make run stopped {time.monotonic() - t0:.1f} s after Ctrl-C")
    # run-local.sh kills what does not stop within its bound: that is a failure too
    out = log.read_text()
    assert "did not stop within" not in out, out[-6000:]


def _checkout(tmp_path: Path, model_dir: Path) -> tuple[Path, dict[str, str]]:
    require((REPO / ".venv/bin/aggregator").exists(), "venv not set up")
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts/run-local.sh", root / "scripts/run-local.sh")
    (root / ".venv").symlink_to(REPO / ".venv")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APPLIANCE_", "AGGREGATOR_"))}
    env.update({
        "AGGREGATOR_PORT": str(free_port()),
        "APPLIANCE_DEVICE__DEVICE_ID": "pi-local",
        "APPLIANCE_PATHS__MODEL_DIR": str(model_dir),
        "APPLIANCE_CAMERA__SOURCE": str(tmp_path / "no-camera.mp4"),  # retried, never fatal
        "APPLIANCE_WEB__ENABLED": "false",
        "APPLIANCE_SYNC__HEARTBEAT_S": "5",
    })
    return root, env


def test_make_run_starts_both_and_syncs(tmp_path: Path, model_dir: Path) -> None:
    import httpx

    root, env = _checkout(tmp_path, model_dir)
    web_port = free_port()
    env.update(APPLIANCE_WEB__ENABLED="true", APPLIANCE_WEB__PORT=str(web_port))
    db = root / "data/aggregator/aggregator.db"
    sync_env = root / "data/local-sync.env"
    log = tmp_path / "run.log"
    proc = _run(root, log, env)
    try:
        wait_until(lambda: _heartbeats(db) >= 1 or proc.poll() is not None, 120,
                   "a heartbeat from the appliance at the local aggregator", 0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        wait_until(lambda: "Next steps" in log.read_text() or proc.poll() is not None, 60,
                   "the next-steps banner", 0.5)
        banner = log.read_text().split("Next steps", 1)[1]
        assert f"http://127.0.0.1:{web_port}" in banner and "data/local-sync.env" in banner
        assert "APPLIANCE_CAMERA__SOURCE=" in banner
        assert "schedules add --room LAB-301 --course TRY --now" in banner
        assert "students add S001" in banner and "faces encode --batch" in banner
        assert "students consent S001 grant" in banner
        # a recording worker runs too (uploaded recordings would otherwise stay "queued")
        wait_until(lambda: _workers(db) == ["run-local-worker"], 60, "the recording worker",
                   0.5)
        # the banner's promise: the device key opens the status page
        key = next(line.split("=", 1)[1] for line in sync_env.read_text().splitlines()
                   if line.startswith("APPLIANCE_SYNC__API_KEY="))
        login = httpx.post(f"http://127.0.0.1:{web_port}/login", data={"password": key})
        assert login.status_code == 303 and "appliance_session" in login.headers["set-cookie"]
        # a second `make run` refuses at once, says why, and leaves the first one running
        second = subprocess.run(["bash", "scripts/run-local.sh"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "`make run` is already running here" in second.stderr
        assert "address already in use" not in second.stdout + second.stderr
        assert proc.poll() is None
    finally:
        _ctrl_c(proc, log)
    assert stat.S_IMODE(sync_env.stat().st_mode) == 0o600
    assert key and key not in log.read_text()
    first = _heartbeats(db)
    # Second run: the same key is reused (no new registration), and it syncs again.
    proc = _run(root, log, env)
    try:
        wait_until(lambda: _heartbeats(db) > first or proc.poll() is not None, 120,
                   "a heartbeat after the restart", 0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        _ctrl_c(proc, log)
    assert "first run" not in log.read_text().split("run-local: aggregator on")[-1]
    # Nothing left running: both children were in the script's process group. (Helpers such
    # as multiprocessing's resource tracker exit on their own just after their parent; zombies
    # do not count: this container's init may not reap orphans.)

    def running() -> list[str]:
        out = subprocess.run(["ps", "-o", "pid=,stat=,cmd=", "-g", str(proc.pid)],
                             capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line.split()[1:2] != ["Z"]]

    wait_until(lambda: running() == [], 15, "every process of `make run` to end", 0.2)
    assert _workers(db) == []  # the worker removed its row when it stopped


@pytest.mark.mqtt
def test_make_run_with_mqtt_urls_uses_mqtt(tmp_path: Path, model_dir: Path) -> None:
    from cloud_sync.protocol import device_topic
    from tests.support.harness import MOSQUITTO, Broker
    from tests.support.mqtt_client import TestClient

    require(MOSQUITTO.exists(), "mosquitto is not installed")
    root, env = _checkout(tmp_path, model_dir)
    broker = Broker(tmp_path / "broker", ["aggregator", "homeassistant", "pi-local"])
    broker.start()
    env["AGGREGATOR_MQTT_URL"] = broker.url("aggregator")
    env["APPLIANCE_SYNC__MQTT_URL"] = broker.url("pi-local")
    watcher = TestClient(broker, "homeassistant")
    watcher.wait_connected()
    status = device_topic("main", "LAB-301", "pi-local", "status")
    watcher.subscribe(status)
    watcher.subscribe("homeassistant/#")
    db = root / "data/aggregator/aggregator.db"
    log = tmp_path / "run.log"
    proc = _run(root, log, env)
    try:
        wait_until(lambda: _heartbeats(db) >= 1 or proc.poll() is not None, 120,
                   "a heartbeat over MQTT", 0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert watcher.received(status)[-1:] == [b"online"]
        assert any(t.startswith("homeassistant/") for t, _, _ in watcher.messages)
        assert "MQTT connected" in log.read_text()
        assert broker.passwords["pi-local"] not in log.read_text()
    finally:
        _ctrl_c(proc, log)
        wait_until(lambda: watcher.received(status)[-1:] == [b"offline"], 15, "offline")
        watcher.close()
        broker.stop()
