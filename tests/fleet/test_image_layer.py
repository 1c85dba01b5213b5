"""The appliance layer and boot partition of `make image`, on a small fabricated root
directory (no mmdebstrap, no chroot): files, user, enabled units, then a whole image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync import release_manifest as rm
from fleet import disk
from fleet.image import CMDLINE, ENABLED, UNATTENDED, boot_files, configure_root
from fleet.imagetest import (
    ALLOWED_ORIGINS,
    UNATTENDED_WANTED,
    UPDATE_ACTIVE,
    UPDATE_UNITS,
    check_updates,
)
from tests.fleet.conftest import fabricated_root

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def debian_like(root: Path) -> Path:
    fabricated_root(root)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\nvideo:x:44:\n")
    (root / "etc/gshadow").write_text("root:*::\nvideo:*::\n")
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("shared by every card: must go")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    for unit in ("ssh.service", "systemd-networkd.service", "systemd-resolved.service",
                 "systemd-timesyncd.service"):
        lib = root / "lib/systemd/system" / unit
        lib.parent.mkdir(parents=True, exist_ok=True)
        lib.write_text("[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n")
    (root / "usr/lib/raspi-firmware").mkdir(parents=True)
    (root / "usr/lib/raspi-firmware/start4.elf").write_bytes(b"fw")
    (root / "boot/vmlinuz-6.1.0-50-arm64").write_bytes(b"kernel")
    (root / "boot/initrd.img-6.1.0-50-arm64").write_bytes(b"initrd")
    dtbs = root / "usr/lib/linux-image-6.1.0-50-arm64/broadcom"
    dtbs.mkdir(parents=True)
    (dtbs / "bcm2711-rpi-4-b.dtb").write_bytes(b"dtb")
    return root


def test_appliance_layer_and_boot_partition(tmp_path: Path) -> None:
    root = debian_like(tmp_path / "root")
    private, public = rm.generate_keypair()
    (tmp_path / "office.key").write_bytes(private)
    (tmp_path / "office.pub").write_bytes(public)
    with pytest.raises(rm.ReleaseError):  # the private key never goes into an image
        configure_root(root, UNITS, release_keys=[tmp_path / "office.key"])
    configure_root(root, UNITS, release_keys=[tmp_path / "office.pub"])
    # the release key the device's updater trusts (make image RELEASE_PUBKEY=...)
    trusted = rm.load_public_keys([root / "etc/classroom-attendance/release-keys"])
    assert list(trusted) == [rm.key_id(rm.load_public_key(public))]
    passwd = (root / "etc/passwd").read_text()
    assert "attendance:" in passwd and "/usr/sbin/nologin" in passwd
    assert "video:x:44:attendance" in (root / "etc/group").read_text()
    fstab = (root / "etc/fstab").read_text()
    assert "noatime" in fstab and "tmpfs            /tmp" in fstab
    assert "LABEL=rootfs" in fstab and "LABEL=bootfs" in fstab
    journald = (root / "etc/systemd/journald.conf.d/50-classroom-sdcard.conf").read_text()
    assert "Storage=volatile" in journald and "RateLimitBurst" in journald
    assert "MaxRetentionSec=7day" in journald
    # Debian's security suite by unattended-upgrades, never rebooting by itself
    unattended = (root / "etc/apt/apt.conf.d/52classroom-unattended-upgrades").read_text()
    assert "-security" in unattended and 'Automatic-Reboot "false"' in unattended
    assert "bookworm-security" in (root / "etc/apt/sources.list.d/debian-security.list"
                                   ).read_text()
    assert 'Unattended-Upgrade "1"' in (root / "etc/apt/apt.conf.d/20auto-upgrades").read_text()
    watchdog = (root / "etc/systemd/system.conf.d/50-classroom-watchdog.conf").read_text()
    assert "RuntimeWatchdogSec=15s" in watchdog  # the most bcm2835_wdt can count
    assert not list((root / "etc/ssh").glob("ssh_host_*"))  # made per card at first boot
    assert (root / "etc/machine-id").read_text() == ""
    wanted = {p.name for p in (root / "etc/systemd/system").glob("*.target.wants/*")}
    assert wanted >= set(ENABLED)
    assert "classroom-update.timer" in {
        p.name for p in (root / "etc/systemd/system/timers.target.wants").iterdir()}
    boot = tmp_path / "boot"
    boot_files(root, boot)
    assert (boot / "cmdline.txt").read_text() == CMDLINE
    assert "root=LABEL=rootfs" in CMDLINE  # not Debian's /dev/mmcblk0p2
    assert {p.name for p in boot.iterdir()} == {
        "start4.elf", "vmlinuz", "initrd.img", "bcm2711-rpi-4-b.dtb", "config.txt", "cmdline.txt"}

    image = tmp_path / "img"
    layout = disk.assemble(image, boot, root, boot_bytes=64 * disk.MIB,
                           root_bytes=16 * disk.MIB, workdir=tmp_path)
    ext4 = tmp_path / "p2"
    disk.extract_partition(image, layout.root, ext4)
    subprocess.run(["e2fsck", "-f", "-n", str(ext4)], check=True, capture_output=True)
    conf = subprocess.run(["debugfs", "-R", "stat /etc/classroom-attendance/appliance.toml",
                           str(ext4)], capture_output=True, text=True, check=True).stdout
    uid = next(line.split(":")[2] for line in passwd.splitlines()
               if line.startswith("attendance:"))
    assert "Mode:  0600" in conf and f"User: {uid:>5}" in conf
    link = subprocess.run(["debugfs", "-R", "stat /etc/resolv.conf", str(ext4)],
                          capture_output=True, text=True, check=True).stdout
    assert "stub-resolv.conf" in link
    assert disk.fat_read(image, layout.boot, "cmdline.txt").decode() == CMDLINE


def test_image_test_stops_at_once_with_qemus_message_when_the_guest_dies(tmp_path: Path) -> None:
    """make image-test on a machine without ipxe-qemu: qemu exits at once ('failed to find
    romfile'); the wait for SSH must end within seconds and say why, not wait 15 minutes."""
    from fleet.imagetest import GuestDiedError, wait_for

    log = tmp_path / "console.log"
    if shutil.which("qemu-system-aarch64"):
        cmd = ["qemu-system-aarch64", "-M", "virt", "-nographic", "-nodefaults",
               "-device", f"virtio-net-pci,romfile={tmp_path / 'missing.rom'}"]
        expected = "romfile"
    else:  # the same logic with a process that dies the same way
        cmd = [sys.executable, "-c", "import sys; sys.exit('failed to find romfile')"]
        expected = "romfile"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    start = time.monotonic()
    with pytest.raises(GuestDiedError, match=expected) as err:
        wait_for("ssh in the guest", lambda: False, 900, 0.2, guest=proc, log=log)
    assert time.monotonic() - start < 30
    assert "qemu exited with" in str(err.value)


def test_guest_commands_survive_a_starved_sshd(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A loaded machine starves the emulated guest: ssh gave up with "Connection timed out
    during banner exchange" (exit 255) in the middle of a fresh-clone image-test run. Such a
    failure to connect is retried; a failing command is not (it ran: running it again could
    do harm)."""
    from fleet.imagetest import Guest

    calls = tmp_path / "calls"
    fake = tmp_path / "ssh"
    fake.write_text(
        "#!/bin/sh\n"
        f"echo x >> {calls}\n"
        f'n=$(wc -l < {calls})\n'
        'case "$*" in\n'
        '  *fails*) echo "no such file" >&2; exit 1 ;;\n'
        "esac\n"
        'if [ "$n" -lt 3 ]; then\n'
        '  echo "Connection timed out during banner exchange" >&2; exit 255\n'
        "fi\n"
        "echo ran\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr("fleet.imagetest.time.sleep", lambda _s: None)
    guest = Guest(tmp_path / "key", 2222)
    assert guest.run("true") == "ran\n"
    assert len(calls.read_text().splitlines()) == 3
    calls.write_text("x\nx\nx\n")
    with pytest.raises(RuntimeError, match="no such file"):
        guest.run("fails")
    assert len(calls.read_text().splitlines()) == 4  # once


# Debian's own /etc/apt/apt.conf.d/50unattended-upgrades (bookworm, 2.9.1), its active lines
DEBIAN_50_UNATTENDED = """\
Unattended-Upgrade::Origins-Pattern {
        "origin=Debian,codename=${distro_codename},label=Debian";
        "origin=Debian,codename=${distro_codename},label=Debian-Security";
        "origin=Debian,codename=${distro_codename}-security,label=Debian-Security";
};
Unattended-Upgrade::Package-Blacklist {
};
"""
DEBIAN_MAIN_ORIGIN = ('Unattended-Upgrade::Origins-Pattern:: "origin=Debian,'
                      'codename=${distro_codename},label=Debian";')


def apt_config_dump(parts: Path) -> list[str]:
    """``apt-config dump`` as apt on a device reads apt.conf.d: Debian's
    50unattended-upgrades (from the package) beside the files already in ``parts``."""
    (parts / "50unattended-upgrades").write_text(DEBIAN_50_UNATTENDED)
    main = parts.parent / "apt.conf"
    main.write_text(f'Dir::Etc::Parts "{parts}";\n')
    return subprocess.run(["apt-config", "dump"], env={**os.environ, "APT_CONFIG": str(main)},
                          capture_output=True, text=True, check=True).stdout.splitlines()


class _UpdatesGuest:
    """Canned answers of a booted card to check_updates' commands."""

    def __init__(self, **override: str) -> None:
        self.answers = {
            "systemctl is-enabled": "\n".join("enabled" for _ in UPDATE_UNITS) + "\n",
            "systemctl is-active": "\n".join("active" for _ in UPDATE_ACTIVE) + "\n",
            "trusted-keys.py": '{"keys_dir": "/etc/classroom-attendance/release-keys", '
                               '"enabled": true, "trusted": ["0123456789abcdef"]}\n',
            "dpkg-query": "install ok installed",
            "apt-config dump": "\n".join(["APT \"\";", *ALLOWED_ORIGINS, *UNATTENDED_WANTED]),
            "systemctl start classroom-update.service":
                "success\n2026-12-07 INFO x: starting\nnothing to do\n",
            **override}
        self.texts: dict[str, str] = {}

    def run(self, command: str, timeout: float = 600) -> str:
        for prefix, answer in self.answers.items():
            if prefix in command:
                return answer
        raise AssertionError(command)

    def put_text(self, text: str, remote: str) -> None:
        self.texts[remote] = text


@pytest.mark.parametrize("override", [
    {},
    {"systemctl is-enabled": "enabled\ndisabled\nenabled\nenabled\nenabled\nenabled\n"},
    {"systemctl is-active": "active\nactive\ninactive\nactive\n"},
    {"trusted-keys.py": '{"keys_dir": "/x", "enabled": true, "trusted": []}'},
    {"dpkg-query": "dpkg-query: no packages found matching unattended-upgrades"},
    {"apt-config dump": 'APT::Periodic::Unattended-Upgrade "1";\n'},
    {"apt-config dump": "\n".join([DEBIAN_MAIN_ORIGIN, *ALLOWED_ORIGINS, *UNATTENDED_WANTED])},
    {"systemctl start classroom-update.service":
        "exit-code\nerror: something\n"},
    {"systemctl start classroom-update.service":
        "success\nWARNING appliance.update.updater: update check: 503\nnothing to do\n"},
], ids=["healthy", "timer-disabled", "path-inactive", "key-untrusted", "no-unattended",
        "security-origin-missing", "main-suite-too", "update-service-failed",
        "aggregator-unreachable"])
def test_image_test_update_check_fails_on_each_missing_piece(override: dict[str, str]) -> None:
    """Issue 27's device side in make image-test: every piece is needed for a pass."""
    guest = _UpdatesGuest(**override)
    result = check_updates(guest, "0123456789abcdef")  # type: ignore[arg-type]
    assert result["ok"] is (not override), result
    assert "ReleaseManager" in guest.texts["/root/trusted-keys.py"]


@pytest.mark.skipif(not shutil.which("apt-config"), reason="apt-config: a Debian machine")
def test_unattended_upgrades_takes_the_security_suite_only(tmp_path: Path) -> None:
    """The unattended-upgrades package installs Debian's 50unattended-upgrades, whose list also
    allows the main suite (point releases); the image's 52classroom-unattended-upgrades must
    leave Debian's security suite (and, on Raspberry Pi OS, Raspberry Pi's kernel/firmware
    archive) as the only origins (docs/OPERATIONS.md 6.10), as apt reads the two files on the
    device, with the camera's userland held back."""
    parts = tmp_path / "apt.conf.d"
    parts.mkdir()
    (parts / "52classroom-unattended-upgrades").write_text(UNATTENDED)
    dump = apt_config_dump(parts)
    origins = [ln for ln in dump if ln.startswith("Unattended-Upgrade::Origins-Pattern::")]
    # Debian's security suite; Raspberry Pi's archive exists only on Raspberry Pi OS cards
    assert origins == list(ALLOWED_ORIGINS)
    assert 'Unattended-Upgrade::Automatic-Reboot "false";' in dump
    assert 'Unattended-Upgrade::Package-Blacklist:: "python3-picamera2";' in dump
