"""`make deploy` against two test hosts on this machine: two real sshd servers on loopback
ports, each host with its own /opt prefix, data directory and a real `appliance run` (the
service) reading a video file. Release 1 goes to both hosts in parallel and its pipeline's
health is awaited; release 2 breaks the camera, its health check fails, and it is rolled back.
The outbox records under the data directory survive all of it; two releases are kept.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from appliance.store import Store
from cloud_sync.protocol import AttendanceRecord
from fleet.bundle import REPO, build_bundle
from fleet.deploy import Deployer, Host, parse_hosts, pipeline_runs, summary_table
from tests.conftest import require

pytestmark = pytest.mark.slow

SERVICE = """#!/bin/sh
# The test host's service manager: stop the running appliance, start `current`'s.
here={here}
if [ -f $here/appliance.pid ]; then
  pid=$(cat $here/appliance.pid)
  kill $pid 2>/dev/null
  for i in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  kill -9 $pid 2>/dev/null
fi
APPLIANCE_CONFIG=$here/appliance.toml APPLIANCE_PATHS__DATA_DIR=$here/data \\
APPLIANCE_PATHS__MODEL_DIR={prefix}/current/models \\
  setsid {prefix}/current/bin/appliance run >> $here/appliance.log 2>&1 < /dev/null &
echo $! > $here/appliance.pid
"""

CONFIG = """
[device]
device_id = "{name}"
room_id = "LAB-301"
[camera]
source = "{clip}"
loop_file = true
fps = 4.0
[web]
host = "127.0.0.1"
port = {port}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TestHost:
    host: Host
    home: Path
    sshd: subprocess.Popen[bytes]

    @property
    def prefix(self) -> Path:
        return Path(self.host.prefix)

    def current(self) -> str:
        return os.readlink(self.prefix / "current").removeprefix("releases/")

    def releases(self) -> set[str]:
        return {p.name for p in (self.prefix / "releases").iterdir()}


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(shutil.which("ssh-keygen") is not None and Path("/usr/sbin/sshd").exists(),
            "openssh-server missing (scripts/ensure-system-deps.sh test)")
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def start_host(name: str, base: Path, key: Path, clip: Path) -> TestHost:
    home = base / name
    (home / "data").mkdir(parents=True)
    prefix = home / "opt/classroom-attendance"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(home / "host_key")], check=True)
    (home / "authorized_keys").write_text(key.with_suffix(".pub").read_text())
    (home / "authorized_keys").chmod(0o600)
    port = free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home}/host_key\n"
        f"AuthorizedKeysFile {home}/authorized_keys\nPidFile {home}/sshd.pid\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nPrintMotd no\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(home / "sshd_config")],
                            stderr=(home / "sshd.log").open("wb"))
    (home / "service.sh").write_text(SERVICE.format(here=home, prefix=prefix))
    (home / "service.sh").chmod(0o755)
    (home / "appliance.toml").write_text(CONFIG.format(name=name, clip=clip, port=free_port()))
    web_port = int((home / "appliance.toml").read_text().split("port = ")[1].split()[0])
    host = Host(name=name, address="127.0.0.1", port=port, user=getpass.getuser(),
                prefix=str(prefix), restart=f"sh {home}/service.sh",
                health_url=f"http://127.0.0.1:{web_port}/health")
    for _ in range(50):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return TestHost(host, home, sshd)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, ssh_key: Path,
          faces_dir: Path) -> Iterator[list[TestHost]]:
    clip = faces_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"
    require(clip.is_file(), f"{clip} missing")
    base = tmp_path_factory.mktemp("hosts")
    started = [start_host(name, base, ssh_key, clip) for name in ("pi-test-a", "pi-test-b")]
    yield started
    for h in started:
        pid_file = h.home / "appliance.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        h.sshd.terminate()
        h.sshd.wait(10)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("bundles")
    cache = REPO / "build" / "cache"
    good = build_bundle(out / "good", platform="native", cache=cache, version="0.1.0+gtest1")
    # release 2 breaks the camera: every video file "does not exist"
    broken = build_bundle(out / "broken", platform="native", cache=cache,
                          version="0.1.0+gtest2", patch={"appliance/capture/opencv.py": (
                              "if not self.path.is_file():", "if True:  # the faulty release")})
    return good, broken


def known_hosts(hosts: list[TestHost], path: Path) -> str:
    lines = []
    for h in hosts:
        pub = (h.home / "host_key.pub").read_text().split()
        lines.append(f"[127.0.0.1]:{h.host.port} {pub[0]} {pub[1]}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def outbox_keys(home: Path) -> set[str]:
    store = Store(home / "data")
    try:
        return {str(r.key) for r in store.unsent_records(1000)}
    finally:
        store.close()


# Two real installs into release venvs over ssh, a failed one and its rollback: 1.5-4 min on a
# quiet 2-core machine, over the default 300 s when the machine is loaded.
@pytest.mark.timeout(900)
def test_deploy_then_failed_release_rolls_back(hosts: list[TestHost], bundles: tuple[Path, Path],
                                               ssh_key: Path, tmp_path: Path) -> None:
    good, broken = bundles
    a, b = hosts
    # host b was installed before: two old releases (placeholders), the outbox holds a record
    for old in ("0.0.1", "0.0.2"):
        (b.prefix / "releases" / old).mkdir(parents=True)
        (b.prefix / "releases" / old / ".installed").touch()
        time.sleep(0.05)
    (b.prefix / "current").symlink_to("releases/0.0.2")
    key = uuid.uuid4()
    store = Store(b.home / "data")
    store.add_record(AttendanceRecord(key=key, student_id="S001", room_id="LAB-301",
                                      device_id="pi-test-b", seen_at=datetime.now(UTC),
                                      confidence=0.9))
    store.close()

    kwargs = dict(client_keys=[str(ssh_key)], known_hosts=known_hosts(hosts, tmp_path / "kh"),
                  health_timeout=150.0, limit=2)
    start = time.monotonic()
    results = Deployer(good, **kwargs).run_sync([a.host, b.host])
    first = time.monotonic() - start
    table = {r.host: r for r in results}
    assert table["pi-test-a"].result == "updated", table["pi-test-a"]
    assert table["pi-test-b"].result == "updated", table["pi-test-b"]
    assert (table["pi-test-a"].old, table["pi-test-b"].old) == ("-", "0.0.2")
    assert a.current() == b.current() == "0.1.0+gtest1"
    # the last two releases are kept: the new one and the one before it
    assert b.releases() == {"0.1.0+gtest1", "0.0.2"}
    assert str(key) in outbox_keys(b.home)
    # hosts ran in parallel (limit 2): the whole run is shorter than the two hosts' times added
    assert first < 0.9 * (table["pi-test-a"].seconds + table["pi-test-b"].seconds)
    assert {"push", "install", "health"} <= set(table["pi-test-a"].steps)
    print(f"release 1 on two hosts: {first:.0f} s", summary_table(results))

    # release 2: health fails (camera), rolled back to release 1 whose pipeline runs again
    results = Deployer(broken, **{**kwargs, "health_timeout": 15.0}).run_sync([a.host])
    (r,) = results
    assert r.result == "rolled back", r
    assert (r.old, r.new) == ("0.1.0+gtest1", "0.1.0+gtest2")
    assert "camera" in r.detail
    assert a.current() == "0.1.0+gtest1"
    assert a.releases() == {"0.1.0+gtest1", "0.1.0+gtest2"}
    # the same release again is not reinstalled
    (again,) = Deployer(good, **kwargs).run_sync([a.host])
    assert again.result == "unchanged"
    assert str(key) in outbox_keys(b.home)


def test_unreachable_host_and_bad_health() -> None:
    assert pipeline_runs({"error": "URLError"}, "1") == "/health not answering (URLError)"
    doc = {"version": "2", "components": {"camera": {"status": "healthy"},
                                          "detector": {"status": "healthy", "frames": 3}}}
    assert pipeline_runs(doc, "2") is None
    assert "version 2, not 3" in str(pipeline_runs(doc, "3"))
    doc["components"]["detector"]["frames"] = 0  # type: ignore[index]
    assert pipeline_runs(doc, "2") is not None
    parsed = parse_hosts("pi-a root@10.0.0.7:2222")
    assert [(h.name, h.address, h.port, h.user) for h in parsed] == [
        ("pi-a", "pi-a", 22, "root"), ("root@10.0.0.7:2222", "10.0.0.7", 2222, "root")]
