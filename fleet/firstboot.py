"""First boot of a flashed card (runs on the device, as root, from classroom-firstboot.service).

Reads the settings ``make flash`` wrote into the FAT partition, moves the secrets into
/etc/classroom-attendance (0600, owned by the service user), sets hostname, Wi-Fi (with the
card's country), SSH keys and NTP servers, and deletes the file from FAT once every one of these
steps succeeded (a failed step keeps it, so the next boot tries again); grows the root partition
to the card, checks the device key against the aggregator by pulling the room's schedule
(registration happened at flash time), and records what it did in ``provisioning.json`` under
the data directory, which the status page and /health read ("provisioned", and what is missing).
Every step is idempotent; a step that fails is recorded and the others still run, so a device
with a wrong Wi-Fi passphrase still boots and says so.

Run: ``python -m fleet.firstboot [--boot /boot/firmware] [--root /]`` (``--root`` lets the
tests run it against a directory tree).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import ValidationError

from fleet.settings import SETTINGS_FILE, DeviceSettings, load

_LOGGER = logging.getLogger(__name__)

SERVICE_USER = "attendance"
CONFIG_DIR = Path("etc/classroom-attendance")
DATA_DIR = Path("var/lib/classroom-attendance")
STATUS_FILE = "provisioning.json"
BOOT_CANDIDATES = ("boot/firmware", "boot")


@dataclass
class Report:
    provisioned: bool = False
    device_id: str | None = None
    room_id: str | None = None
    steps: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def ok(self, step: str, note: str = "ok") -> None:
        if not self.steps.get(step, "").startswith("failed"):  # a failure is not overwritten
            self.steps[step] = note

    def fail(self, step: str, reason: str) -> None:
        self.steps[step] = f"failed: {reason}"
        self.missing.append(f"{step}: {reason}")

    def as_dict(self) -> dict[str, object]:
        return {"provisioned": self.provisioned, "device_id": self.device_id,
                "room_id": self.room_id, "steps": self.steps, "missing": self.missing,
                "at": datetime.now(UTC).isoformat(timespec="seconds")}


def _own(path: Path, root: Path) -> None:
    """Give a file to the service user (when it exists here; tests run without it)."""
    try:
        entry = pwd.getpwnam(SERVICE_USER) if root == Path("/") else None
    except KeyError:
        entry = None
    if entry is not None:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _write_secret(path: Path, text: str, root: Path, *, service: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if service:
        _own(tmp, root)
    os.replace(tmp, path)


def appliance_toml(settings: DeviceSettings) -> str:
    def q(value: str) -> str:
        return json.dumps(value)

    lines = [
        "# Written by the first boot from the card's settings (make flash). 0600: holds the key.",
        "[device]", f"device_id = {q(settings.device_id)}", f"room_id = {q(settings.room_id)}",
        # the unit sets these by environment; here too, so commands run by hand with
        # --config use the same directories
        "", "[paths]", 'data_dir = "/var/lib/classroom-attendance"',
        'model_dir = "/opt/classroom-attendance/current/models"',
        "", "[sync]", f"aggregator_url = {q(str(settings.aggregator_url).rstrip('/'))}",
        f"api_key = {q(settings.device_key.get_secret_value())}",
    ]
    if settings.camera_source:
        lines += ["", "[camera]", f"source = {q(settings.camera_source)}"]
    # the status page on the classroom network (locked until `appliance web set-password`)
    lines += ["", "[web]", 'host = "0.0.0.0"']
    return "\n".join(lines) + "\n"


def _wifi(settings: DeviceSettings, root: Path, report: Report) -> None:
    if not settings.wifi_ssid:
        report.ok("wifi", "not configured (wired)")
        return
    psk = settings.wifi_psk.get_secret_value() if settings.wifi_psk else None
    _regulatory_domain(settings, root)
    if shutil.which("nmcli") and root == Path("/"):
        # Raspberry Pi OS (bookworm) manages networks with NetworkManager
        cmd = ["nmcli", "connection", "add", "type", "wifi", "con-name", "classroom",
               "ifname", "wlan0", "ssid", settings.wifi_ssid, "connection.autoconnect", "yes"]
        if psk:
            cmd += ["wifi-sec.key-mgmt", "wpa-psk", "wifi-sec.psk", psk]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            report.fail("wifi", "nmcli could not add the connection")
            return
        _radio_on(settings, report)
        report.ok("wifi", f"NetworkManager ({settings.wifi_country})")
        return
    network = [f"ssid={json.dumps(settings.wifi_ssid)}"]
    network.append(f"psk={json.dumps(psk)}" if psk else "key_mgmt=NONE")
    conf = (f"ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\nupdate_config=0\n"
            f"country={settings.wifi_country}\n\nnetwork={{\n"
            + "".join(f"    {line}\n" for line in network) + "}\n")
    _write_secret(root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf", conf, root,
                  service=False)
    _systemctl(root, "enable", "wpa_supplicant@wlan0.service")
    if root == Path("/"):
        _radio_on(settings, report)
        if not _systemctl(root, "restart", "wpa_supplicant@wlan0.service"):
            report.fail("wifi", "wpa_supplicant@wlan0 did not start (no wlan0?)")
            return
    report.ok("wifi", f"wpa_supplicant ({settings.wifi_country})")


def _regulatory_domain(settings: DeviceSettings, root: Path) -> None:
    """The Wi-Fi country, for every later boot too (cfg80211 reads it when it loads)."""
    _write(root / "etc/modprobe.d/classroom-wifi.conf",
           f"# written by the first boot (make flash WIFI_COUNTRY=)\n"
           f"options cfg80211 ieee80211_regdom={settings.wifi_country}\n")


def _radio_on(settings: DeviceSettings, report: Report) -> None:
    """Now: set the country and unblock the radio (Raspberry Pi OS soft-blocks Wi-Fi until a
    country is set). A missing tool is recorded, never a crash of the first boot."""
    for cmd in (["iw", "reg", "set", str(settings.wifi_country)], ["rfkill", "unblock", "wifi"]):
        if shutil.which(cmd[0]) is None:
            report.fail("wifi", f"{cmd[0]} is not installed")
            continue
        subprocess.run(cmd, check=False, capture_output=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


TIMESYNCD_CONF = "etc/systemd/timesyncd.conf.d/50-classroom.conf"


def _time(settings: DeviceSettings, root: Path, report: Report) -> None:
    """NTP servers from the card (a school network may block the public pool; a Pi has no
    real-time clock, so until one answers the clock is wherever the last boot left it)."""
    conf = root / TIMESYNCD_CONF
    if not settings.ntp:
        conf.unlink(missing_ok=True)
        report.ok("time", "NTP: the distribution's servers")
        return
    _write(conf, "# written by the first boot (make flash NTP=)\n[Time]\n"
           f"NTP={' '.join(settings.ntp)}\n")
    if root == Path("/"):
        _systemctl(root, "restart", "systemd-timesyncd.service")
    report.ok("time", f"NTP: {' '.join(settings.ntp)}")


def _systemctl(root: Path, *args: str) -> bool:
    cmd = ["systemctl", *args] if root == Path("/") else ["systemctl", f"--root={root}", *args]
    if args[0] in ("restart", "start") and root != Path("/"):
        return True
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def _hostname(settings: DeviceSettings, root: Path, report: Report) -> None:
    (root / "etc/hostname").write_text(settings.hostname + "\n")
    hosts = root / "etc/hosts"
    lines = [ln for ln in (hosts.read_text().splitlines() if hosts.exists() else [])
             if not ln.startswith("127.0.1.1")]
    lines.append(f"127.0.1.1\t{settings.hostname}")
    hosts.write_text("\n".join(lines) + "\n")
    if root == Path("/"):
        subprocess.run(["hostname", settings.hostname], check=False)
    report.ok("hostname", settings.hostname)


def _ssh(settings: DeviceSettings, root: Path, report: Report) -> None:
    if not settings.ssh_authorized_keys:
        report.ok("ssh", "no key: SSH login disabled")
        return
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    present = keys.read_text().splitlines() if keys.exists() else []
    merged = present + [k for k in settings.ssh_authorized_keys if k not in present]
    _write_secret(keys, "\n".join(merged) + "\n", root, service=False)
    _systemctl(root, "enable", "ssh.service")
    if root == Path("/"):
        _systemctl(root, "start", "ssh.service")
    report.ok("ssh", f"{len(settings.ssh_authorized_keys)} key(s)")


RELEASE_KEYS_DIR = Path("etc/classroom-attendance/release-keys")


def _release_keys(settings: DeviceSettings, root: Path, report: Report) -> None:
    """The flashed release keys beside the image's (docs/OPERATIONS.md 6.10)."""
    if not settings.release_keys:
        report.ok("release keys", "none flashed (the image's, if any)")
        return
    keys = root / RELEASE_KEYS_DIR
    keys.mkdir(parents=True, exist_ok=True)
    for n, pem in enumerate(settings.release_keys, 1):
        path = keys / f"flashed-{n}.pub"
        path.write_text(pem if pem.endswith("\n") else pem + "\n")
        path.chmod(0o644)
    report.ok("release keys", f"{len(settings.release_keys)} key(s)")


def grow_root(report: Report) -> None:
    """Grow the root partition and its file system to the end of the card (growpart)."""
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True,
                            text=True, check=False).stdout.strip()
    name = Path(os.path.realpath(source)).name
    part_file = Path("/sys/class/block", name, "partition")
    parent = subprocess.run(["lsblk", "-n", "-o", "PKNAME", source], capture_output=True,
                            text=True, check=False).stdout.strip()
    if not part_file.exists() or not parent:
        report.fail("grow_root", f"root {source or '?'} is not a partition of a disk")
        return
    grow = subprocess.run(["growpart", f"/dev/{parent}", part_file.read_text().strip()],
                          capture_output=True, text=True, check=False)
    if grow.returncode not in (0, 1):  # 1 = NOCHANGE (already the whole card)
        report.fail("grow_root", (grow.stderr or grow.stdout).strip()[:200])
        return
    resize = subprocess.run(["resize2fs", source], capture_output=True, text=True, check=False)
    if resize.returncode != 0:
        report.fail("grow_root", resize.stderr.strip()[:200])
        return
    report.ok("grow_root", "grown" if grow.returncode == 0 else "already full size")


def check_aggregator(settings: DeviceSettings, report: Report, *, wait_s: float,
                     client: httpx.Client | None = None) -> None:
    """Pull the room's schedule with the device key: proves network, URL and key at once."""
    url = f"{str(settings.aggregator_url).rstrip('/')}/api/v1/schedule"
    headers = {"Authorization": f"Bearer {settings.device_key.get_secret_value()}"}
    deadline = time.monotonic() + wait_s
    own = client is None
    client = client or httpx.Client(timeout=10)
    reason = "no answer"
    try:
        while True:
            try:
                resp = client.get(url, params={"room_id": settings.room_id}, headers=headers)
            except httpx.HTTPError as err:
                reason = f"not reachable ({type(err).__name__})"
            else:
                if resp.status_code == 200:
                    sessions = resp.json().get("sessions", [])
                    report.ok("aggregator", f"key accepted, schedule pulled "
                              f"({len(sessions)} session(s) today)")
                    return
                reason = f"answered {resp.status_code}"
                if resp.status_code in (401, 403):
                    break  # a refused key does not get better by waiting
            if time.monotonic() >= deadline:
                break
            time.sleep(3)
    finally:
        if own:
            client.close()
    report.fail("aggregator", reason)


def find_settings(root: Path) -> Path | None:
    for boot in BOOT_CANDIDATES:
        candidate = root / boot / SETTINGS_FILE
        if candidate.exists():
            return candidate
    return None


def provision(root: Path = Path("/"), *, wait_s: float = 120.0, grow: bool = True,
              client: httpx.Client | None = None) -> Report:
    report = Report()
    status_path = root / DATA_DIR / STATUS_FILE
    source = find_settings(root)
    if source is None:
        if (root / CONFIG_DIR / "appliance.toml").exists() and status_path.exists():
            return recheck(root, status_path, wait_s=wait_s, client=client)
        report.missing.append("settings: no classroom-device.toml on the boot partition "
                              "(flash the card with `make flash`)")
        _save(report, status_path, root)
        return report
    try:
        settings = load(source.read_text())
    except (ValidationError, ValueError) as err:
        report.fail("settings", f"{source.name} is invalid ({_first_error(err)})")
        _save(report, status_path, root)
        return report
    report.device_id, report.room_id = settings.device_id, settings.room_id
    _write_secret(root / CONFIG_DIR / "appliance.toml", appliance_toml(settings), root,
                  service=True)
    for name, apply in (("hostname", _hostname), ("wifi", _wifi), ("ssh", _ssh),
                        ("time", _time), ("release keys", _release_keys)):
        try:
            apply(settings, root, report)
        except Exception as err:  # one step's failure is recorded; the others still run
            _LOGGER.exception("first boot step %s", name)
            report.fail(name, f"{type(err).__name__}: {err}"[:200])
    if report.missing:
        # a step failed: the card's settings stay, so the next boot applies them again
        # (otherwise a card whose Wi-Fi step died would boot unprovisioned for good)
        report.ok("settings", "written to /etc/classroom-attendance/appliance.toml; kept on "
                  "the boot partition until every step succeeds")
    else:
        # the secrets now live in /etc only: remove them from the FAT partition
        source.unlink()
        os.sync()
        report.ok("settings", "moved to /etc/classroom-attendance/appliance.toml")
    if grow and root == Path("/"):
        grow_root(report)
    check_aggregator(settings, report, wait_s=wait_s, client=client)
    report.provisioned = not report.missing
    _save(report, status_path, root)
    return report


def recheck(root: Path, status_path: Path, *, wait_s: float,
            client: httpx.Client | None) -> Report:
    """A later boot: if the aggregator check failed before (no network at first boot), try it
    again with the settings now in /etc; everything else was done once."""
    saved = json.loads(status_path.read_text())
    report = Report(**{k: v for k, v in saved.items() if k != "at"})
    if report.provisioned or any(not m.startswith("aggregator:") for m in report.missing):
        return report
    try:
        conf = tomllib.loads((root / CONFIG_DIR / "appliance.toml").read_text())
        settings = DeviceSettings.model_validate({
            "device_id": conf["device"]["device_id"], "room_id": conf["device"]["room_id"],
            "aggregator_url": conf["sync"]["aggregator_url"],
            "device_key": conf["sync"]["api_key"],
            "hostname": (root / "etc/hostname").read_text().strip()})
    except (KeyError, OSError, ValueError, ValidationError):
        return report
    report.missing = []
    check_aggregator(settings, report, wait_s=wait_s, client=client)
    report.provisioned = not report.missing
    _save(report, status_path, root)
    return report


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
    return str(err)


def _save(report: Report, path: Path, root: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    _own(path, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument("--wait", type=float, default=120.0,
                        help="seconds to wait for the aggregator")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = provision(args.root, wait_s=args.wait)
    for step, note in report.steps.items():
        _LOGGER.info("%s: %s", step, note)
    for item in report.missing:
        _LOGGER.warning("missing: %s", item)
    _LOGGER.info("provisioned: %s", report.provisioned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
