"""`make image BASE=...`: a Raspberry Pi OS Lite image customised without mounting, checked on a
fabricated image with Raspberry Pi OS Lite's layout (the real one cannot be downloaded here):
FAT `bootfs` at sector 8192 (512 MiB), ext4 `rootfs` right after it (sector 1056768)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fleet import disk
from fleet.image import AUTO_UPGRADES, FIRSTRUN, FIRSTRUN_DIR, UNATTENDED, customize_raspios
from fleet.imagetest import ALLOWED_ORIGINS, UNATTENDED_WANTED
from tests.fleet.test_image_layer import apt_config_dump

CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 "
           "fsck.repair=yes rootwait quiet init=/usr/lib/raspberrypi-sys-mods/firstboot")


def raspios_like(tmp: Path) -> Path:
    """Built with the tools directly (not fleet.disk), with Raspberry Pi OS's numbers."""
    image = tmp / "raspios-lite-arm64.img"
    boot_sectors, root_start, root_sectors = 1048576, 1056768, 65536
    with image.open("wb") as fh:
        fh.truncate((root_start + root_sectors) * 512)
    script = (f"label: dos\nlabel-id: 0x4e639091\nstart=8192, size={boot_sectors}, type=c\n"
              f"start={root_start}, size={root_sectors}, type=83\n")
    subprocess.run(["sfdisk", "-q", str(image)], input=script, text=True, check=True)
    fat = tmp / "bootfs"
    subprocess.run(["mkfs.vfat", "-C", "-F", "32", "-n", "bootfs", str(fat),
                    str(boot_sectors // 2)], check=True, capture_output=True)
    for name, text in (("cmdline.txt", CMDLINE + "\n"), ("config.txt", "arm_64bit=1\n")):
        (tmp / name).write_text(text)
        subprocess.run(["mcopy", "-i", str(fat), str(tmp / name), "::"], check=True)
    rootdir = tmp / "rootdir"
    (rootdir / "etc").mkdir(parents=True)
    (rootdir / "etc/fstab").write_text(
        "proc /proc proc defaults 0 0\nPARTUUID=4e639091-01 /boot/firmware vfat defaults 0 2\n"
        "PARTUUID=4e639091-02 / ext4 defaults 0 1\n")
    root = tmp / "rootfs"
    subprocess.run(["mkfs.ext4", "-q", "-L", "rootfs", "-d", str(rootdir), str(root),
                    str(root_sectors // 2) + "k"], check=True)
    for part, offset in ((fat, 8192 * 512), (root, root_start * 512)):
        subprocess.run(["dd", f"if={part}", f"of={image}", "bs=1M", f"seek={offset // disk.MIB}",
                        "conv=notrunc,sparse", "status=none"], check=True)
    return image


def small_bundle(tmp: Path) -> Path:
    bundle = tmp / "bundle"
    for sub in ("wheels", "models", "systemd"):
        (bundle / sub).mkdir(parents=True)
    (bundle / "VERSION").write_text("0.1.0+gtest\n")
    (bundle / "wheels/classroom_attendance-0.1.0+gtest-py3-none-any.whl").write_bytes(b"w" * 5000)
    (bundle / "models/face.tflite").write_bytes(b"m" * 3000)
    (bundle / "install-release.sh").write_text("#!/bin/sh\n")
    (bundle / "systemd/classroom-appliance.service").write_text("[Unit]\n")
    return bundle


def test_raspios_image_customised_on_its_fat_partition(tmp_path: Path) -> None:
    base = raspios_like(tmp_path)
    before = disk.read_layout(base)
    assert (before.boot.start, before.root.start) == (8192, 1056768)
    out = tmp_path / "custom.img.xz"
    timings: dict[str, float] = {}
    work = tmp_path / "work"
    work.mkdir()
    customize_raspios(base, out, bundle=small_bundle(tmp_path), workdir=work, timings=timings)
    raw = tmp_path / "custom.img"
    subprocess.run(["sh", "-c", f"xz -dc {out} > {raw}"], check=True)
    layout = disk.read_layout(raw)
    assert layout == before  # partition table untouched
    cmdline = disk.fat_read(raw, layout.boot, "cmdline.txt").decode()
    assert cmdline.startswith(CMDLINE + " systemd.run=/boot/firmware/classroom/firstrun.sh ")
    assert "systemd.run_success_action=reboot systemd.unit=kernel-command-line.target" in cmdline
    assert cmdline.count("\n") == 1  # one line, as the firmware wants
    assert disk.fat_list(raw, layout.boot, FIRSTRUN_DIR) == [
        "auto-upgrades.conf", "bundle", "firstrun.sh", "journald.conf",
        "unattended-upgrades.conf", "watchdog.conf"]
    # the Debian image's unattended-upgrades policy, the same text (fleet/image.py UNATTENDED)
    assert disk.fat_read(raw, layout.boot, "classroom/unattended-upgrades.conf").decode() \
        == UNATTENDED
    assert disk.fat_read(raw, layout.boot, "classroom/auto-upgrades.conf").decode() \
        == AUTO_UPGRADES
    assert b"RuntimeWatchdogSec=" in disk.fat_read(raw, layout.boot, "classroom/watchdog.conf")
    assert disk.fat_read(raw, layout.boot, "classroom/bundle/VERSION") == b"0.1.0+gtest\n"
    firstrun = disk.fat_read(raw, layout.boot, "classroom/firstrun.sh").decode()
    assert "install-release.sh" in firstrun and "--system-site-packages" in firstrun
    assert firstrun.count("sed -i 's| systemd\\.run=") == 1  # runs once: removes its own args
    fat = tmp_path / "p1"
    disk.extract_partition(raw, layout.boot, fat)
    subprocess.run(["fsck.vfat", "-n", str(fat)], check=True, capture_output=True)
    ext4 = tmp_path / "p2"
    disk.extract_partition(raw, layout.root, ext4)
    subprocess.run(["e2fsck", "-f", "-n", str(ext4)], check=True, capture_output=True)
    assert set(timings) == {"decompress base", "customise FAT", "compress"}


def test_raspios_firstrun_script_edits_cmdline_once(tmp_path: Path) -> None:
    """The sed in firstrun.sh restores the original command line exactly."""
    from fleet.image import FIRSTRUN, RASPIOS_ARGS

    line = next(ln for ln in FIRSTRUN.splitlines() if ln.startswith("sed -i 's| systemd"))
    cmdline = tmp_path / "cmdline.txt"
    cmdline.write_text(CMDLINE + RASPIOS_ARGS + "\n")
    subprocess.run(["sh", "-c", line.replace('"$boot/cmdline.txt"', str(cmdline))], check=True)
    assert cmdline.read_text() == CMDLINE + "\n"


@pytest.mark.skipif(not shutil.which("apt-config"), reason="apt-config: a Debian machine")
def test_raspios_firstrun_installs_the_security_update_policy(tmp_path: Path) -> None:
    """firstrun.sh's own lines put the staged policy where apt reads it; apt then allows only
    Debian's security suite and Raspberry Pi's archive, and never reboots by itself
    (classroom-reboot.timer does, outside class time)."""
    stage = tmp_path / "classroom"
    stage.mkdir()
    from fleet.image import write_unattended

    write_unattended(stage)
    parts = tmp_path / "apt.conf.d"
    parts.mkdir()
    lines = [ln for ln in FIRSTRUN.splitlines()
             if ln.startswith("install -m 0644 \"$here/") and "/etc/apt/apt.conf.d/" in ln]
    assert len(lines) == 2
    for line in lines:
        subprocess.run(["sh", "-c", line.replace("/etc/apt/apt.conf.d", str(parts))],
                       env={"here": str(stage), "PATH": "/usr/bin:/bin"}, check=True)
    assert sorted(p.name for p in parts.iterdir()) == [
        "20auto-upgrades", "52classroom-unattended-upgrades"]
    dump = apt_config_dump(parts)
    origins = [ln for ln in dump if ln.startswith("Unattended-Upgrade::Origins-Pattern::")]
    assert origins == list(ALLOWED_ORIGINS)
    assert all(line in dump for line in UNATTENDED_WANTED)
    assert "apt-get install -y -q --no-install-recommends" in FIRSTRUN
    assert "classroom-unattended-install.service" in FIRSTRUN


def test_not_a_raspios_image(tmp_path: Path) -> None:
    image = tmp_path / "blank.img"
    image.write_bytes(bytes(4 * disk.MIB))
    with pytest.raises(disk.DiskError, match="no MBR table"):
        customize_raspios(image, tmp_path / "o.img.xz", bundle=small_bundle(tmp_path),
                          workdir=tmp_path, timings={})
