"""`make deploy` against two test hosts on this machine: two real sshd servers on loopback
ports, each host with its own /opt prefix, data directory and a real `appliance run` (the
service) reading a video file. Release 1 (signed) goes to both hosts in parallel; each device
checks every file, installs, switches and confirms the release itself once healthy. The broken
release (camera) is sent to one host, which goes back to release 1 by itself: the deploy only
reads the outcome. The outbox records under the data directory survive all of it; two
releases are kept; the second release sends only what the device lacked.
"""

from __future__ import annotations

import contextlib
import getpass
import json
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
from rich.console import Console

from appliance.store import Store
from appliance.update.manager import deps_key
from appliance.update.probe import release_healthy
from cloud_sync import release_manifest as rm
from cloud_sync.protocol import AttendanceRecord
from fleet.deploy import Deployer, Host, parse_hosts, summary_table
from tests.conftest import require
from tests.fleet.releases import BROKEN, V1, Releases

pytestmark = pytest.mark.slow(seconds=240)

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
[update]
prefix = "{prefix}"
keys_dir = "{home}/keys"
restart_command = "sh {home}/service.sh"
confirm_command = ""
units_dir = "{home}/units"
systemctl = ""
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


def start_host(name: str, base: Path, key: Path, clip: Path, releases: Releases) -> TestHost:
    home = base / name
    (home / "data").mkdir(parents=True)
    (home / "units").mkdir()
    (home / "keys").mkdir()
    shutil.copy(releases.public_key, home / "keys" / "office.pub")
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
    (home / "appliance.toml").write_text(CONFIG.format(name=name, clip=clip, port=free_port(),
                                                       prefix=prefix, home=home))
    # the dependency layer a flashed card has (built once per session; see releases.py)
    releases.seed(prefix)
    host = Host(name=name, address="127.0.0.1", port=port, user=getpass.getuser(),
                prefix=str(prefix), config=str(home / "appliance.toml"))
    for _ in range(50):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return TestHost(host, home, sshd)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, ssh_key: Path, faces_dir: Path,
          releases: Releases) -> Iterator[list[TestHost]]:
    clip = faces_dir / "face_recognition" / "examples" / "short_hamilton_clip.mp4"
    require(clip.is_file(), f"{clip} missing")
    base = tmp_path_factory.mktemp("hosts")
    started = [start_host(name, base, ssh_key, clip, releases)
               for name in ("pi-test-a", "pi-test-b")]
    yield started
    for h in started:
        pid_file = h.home / "appliance.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        h.sshd.terminate()
        h.sshd.wait(10)


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


# Two thin installs into release venvs over ssh (the dependency layer is seeded), a failed one
# and the device's own revert.
@pytest.mark.timeout(600)
def test_deploy_then_failed_release_rolls_back(hosts: list[TestHost], releases: Releases,
                                               ssh_key: Path, tmp_path: Path) -> None:
    good, broken = releases.bundles[V1], releases.bundles[BROKEN]
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
    Console(width=160).print(f"release 1 on two hosts: {first:.0f} s", summary_table(results))
    assert table["pi-test-a"].result == "updated", table["pi-test-a"]
    assert table["pi-test-b"].result == "updated", table["pi-test-b"]
    assert (table["pi-test-a"].old, table["pi-test-b"].old) == ("-", "0.0.2")
    assert a.current() == b.current() == V1
    # the last two releases are kept: the new one and the one before it
    assert b.releases() == {V1, "0.0.2"}
    assert str(key) in outbox_keys(b.home)
    # hosts ran in parallel (limit 2): the whole run is shorter than the two hosts' times added
    assert first < 0.9 * (table["pi-test-a"].seconds + table["pi-test-b"].seconds)
    assert {"push", "apply", "trial"} <= set(table["pi-test-a"].steps)
    # the release's units were installed by the device (the confirm unit among them)
    assert (a.home / "units" / "classroom-release-confirm.service").is_file()
    status = json.loads((a.prefix / "update" / "state.json").read_text())
    assert (status["state"], status["version"]) == ("confirmed", V1)
    # install-release.sh and the device's code agree on the dependency layer's key (the device
    # decides from it which wheels it does not need)
    manifest = rm.parse_manifest((good / rm.MANIFEST).read_bytes())
    python = subprocess.run(["python3", "-c", "import sys; print(sys.version)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert (a.prefix / "releases" / V1 / ".deps").read_text().strip() == deps_key(
        manifest, python, "")

    # the broken release: only what host a lacked is sent (the project wheel and VERSION);
    # it is unhealthy (camera), and host a goes back to release 1 by itself
    results = Deployer(broken, **{**kwargs, "health_timeout": 15.0}).run_sync([a.host])
    (r,) = results
    Console(width=160).print(summary_table(results))
    assert r.result == "rolled back", r
    assert (r.old, r.new) == (V1, BROKEN)
    assert "camera" in r.detail
    assert r.sent_bytes < 2_000_000, r.sent_bytes
    assert a.current() == V1
    assert a.releases() == {V1, BROKEN}
    status = json.loads((a.prefix / "update" / "state.json").read_text())
    assert (status["state"], status["version"]) == ("reverted", BROKEN)
    assert "camera" in status["reason"]
    # the same release again is not reinstalled
    (again,) = Deployer(good, **kwargs).run_sync([a.host])
    assert again.result == "unchanged"
    assert str(key) in outbox_keys(b.home)


def test_unreachable_host_and_bad_health() -> None:
    assert release_healthy({"error": "URLError"}, "1") == "/health not answering (URLError)"
    doc = {"version": "2", "components": {"camera": {"status": "healthy"},
                                          "detector": {"status": "healthy", "frames": 3},
                                          "database": {"status": "healthy"},
                                          "aggregator": {"status": "not_configured"}}}
    assert release_healthy(doc, "2") is None
    assert "version 2, not 3" in str(release_healthy(doc, "3"))
    doc["components"]["aggregator"] = {"status": "degraded", "message": "unreachable"}  # type: ignore[index]
    assert release_healthy(doc, "2") == "aggregator: unreachable"
    doc["components"]["aggregator"] = {"status": "healthy"}  # type: ignore[index]
    doc["components"]["database"] = {"status": "unhealthy", "message": "store locked"}  # type: ignore[index]
    assert release_healthy(doc, "2") == "store: store locked"
    doc["components"]["database"] = {"status": "healthy"}  # type: ignore[index]
    doc["components"]["detector"]["frames"] = 0  # type: ignore[index]
    assert release_healthy(doc, "2") is not None
    parsed = parse_hosts("pi-a root@10.0.0.7:2222")
    assert [(h.name, h.address, h.port, h.user) for h in parsed] == [
        ("pi-a", "pi-a", 22, "root"), ("root@10.0.0.7:2222", "10.0.0.7", 2222, "root")]
