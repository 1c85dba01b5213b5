"""`appliance run` as systemd runs it: READY/WATCHDOG over NOTIFY_SOCKET, records, SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.store import Store
from appliance.watchdog import Notifier, watchdog_interval_s
from tests.appliance.test_pipeline import hamilton, roster_file  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]


def test_notifier_sends_datagrams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        notifier = Notifier(path)
        assert notifier.ready("hello") and notifier.ping() and notifier.stopping()
        assert sock.recv(100) == b"READY=1\nSTATUS=hello"
        assert sock.recv(100) == b"WATCHDOG=1"
        assert sock.recv(100) == b"STOPPING=1"
        notifier.close()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().ping()  # no systemd: a no-op
    assert not Notifier(str(tmp_path / "gone.sock")).ping()  # socket gone: logged, no crash
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    assert watchdog_interval_s() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval_s(7) == 7


@pytest.mark.slow
def test_appliance_run_under_a_fake_systemd(hamilton: Path, roster_file: Path,  # noqa: F811
                                            model_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\nmodel_dir = "{model_dir}"\n'
        f'[camera]\nsource = "{hamilton}"\nloop_file = true\n'
        f'[recognition]\nroster_file = "{roster_file}"\n'
        "[web]\nenabled = false\n"
    )
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="2000000", PYTHONUNBUFFERED="1")
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    messages: list[str] = []
    records = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(200).decode())
            db = tmp_path / "data" / "appliance.db"
            if db.exists() and "WATCHDOG=1" in messages:
                store = Store(db)
                records = store.records_since(datetime.now(UTC) - timedelta(hours=1))
                store.close()
                if records:
                    break
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert any(m.startswith("READY=1") for m in messages)
        assert "WATCHDOG=1" in messages
        assert [r.student_id for r in records] == ["S001"]
        assert records[0].device_id == "dev-appliance" and records[0].monotonic_s
        # a second appliance on the same data directory refuses at once, and says why
        t0 = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "appliance", "run", "--config", str(config)], cwd=REPO,
            env={k: v for k, v in env.items() if k != "NOTIFY_SOCKET"}, capture_output=True,
            text=True, timeout=60, check=False)
        assert second.returncode == 1, second.stdout + second.stderr
        assert time.monotonic() - t0 < 15  # before any model or camera is loaded
        assert (f"error: another appliance is already running on {tmp_path / 'data'} "
                f"(pid {proc.pid})") in second.stderr
        assert "models verified" not in second.stdout
        assert proc.poll() is None  # the first one keeps running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        sock.settimeout(0.2)
        try:
            while True:
                messages.append(sock.recv(200).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in messages
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    output = proc.stdout.read() if proc.stdout else ""
    assert "present: S001" in output
    events = Store(tmp_path / "data" / "appliance.db").unsent_events(10)
    assert "device_started" in [e.kind for e in events]


def _start_appliance(config: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, "-m", "appliance", "run", "--config", str(config)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _read_until(proc: subprocess.Popen[str], text: str, timeout_s: float = 120) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} in the output:\n{''.join(lines)[-3000:]}")


def test_ctrl_c_during_start_up_stops_and_a_second_one_exits_at_once(
        hamilton: Path, roster_file: Path, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """Ctrl-C while the descriptor process loads its models: the components not yet started
    are not started, and the device stops. Ctrl-C twice: it exits at once (130)."""
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'[paths]\ndata_dir = "{tmp_path / "data"}"\nmodel_dir = "{model_dir}"\n'
        f'[camera]\nsource = "{hamilton}"\nloop_file = true\n'
        f'[recognition]\nroster_file = "{roster_file}"\n'
        "[web]\nenabled = false\n"
    )
    proc = _start_appliance(config)
    try:
        _read_until(proc, "starting pipeline")
        os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal does
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert "alert monitor and later components not started" in out, out[-3000:]
        assert "appliance running" not in out
        proc = _start_appliance(config)
        _read_until(proc, "starting pipeline")
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert "second Ctrl-C: exiting now" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
