"""``make image``: the SD card image, from Debian's arm64 packages, without Docker or mounts.

Steps (each timed in the log):

1. base root file system: ``image_build/rootfs.sh`` (mmdebstrap, cached as a tarball keyed on
   the script, ~17 min once);
2. release bundle: the project's wheel, the aarch64 wheels of every dependency (cached) and the
   manifest's models (``fleet.bundle``);
3. appliance layer on a copy of the base: the bundle installed into
   /opt/classroom-attendance/releases/<version> (``current`` points at it) by running the
   bundle's own installer in a chroot under qemu-user (binfmt), the ``attendance`` user, the
   units, SD-card friendly settings (journald in RAM, noatime, /tmp in RAM), no SSH host keys
   and an empty machine-id (made per card at first boot);
4. the boot partition: firmware, kernel, initramfs and device trees from the root file system,
   ``config.txt`` and ``cmdline.txt`` with ``root=LABEL=rootfs`` (Debian's raspi-firmware would
   write /dev/mmcblk0p2, which is wrong on USB boot and under qemu);
5. ``fleet.disk.assemble`` + xz.

``make image BASE=raspios.img.xz`` instead customises a Raspberry Pi OS Lite image:
:func:`customize_raspios`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cloud_sync import release_manifest as rm
from fleet import disk
from fleet.bundle import bundle_version

_LOGGER = logging.getLogger(__name__)

PREFIX = "opt/classroom-attendance"
SERVICE_USER = "attendance"
BOOT_BYTES = 256 * disk.MIB
FIRSTRUN_DIR = "classroom"
UNITS = ("classroom-appliance.service", "classroom-firstboot.service",
         "classroom-sshkeys.service", "classroom-release-confirm.service",
         "classroom-console.service", "classroom-update.service", "classroom-update.timer",
         "classroom-update.path", "classroom-reboot.service", "classroom-reboot.timer")
# classroom-update.service has no [Install]: its timer and path start it
ENABLED = ("classroom-appliance.service", "classroom-firstboot.service",
           "classroom-sshkeys.service", "classroom-release-confirm.service",
           "classroom-console.service", "classroom-update.timer", "classroom-update.path",
           "classroom-reboot.timer", "systemd-networkd.service", "systemd-resolved.service",
           "systemd-timesyncd.service", "ssh.service")

FSTAB = """\
# <file system>  <mount point>   <type>  <options>                                  <dump> <pass>
LABEL=rootfs     /               ext4    defaults,noatime,commit=60,errors=remount-ro 0 1
LABEL=bootfs     /boot/firmware  vfat    defaults,noatime,umask=0077,nofail           0 2
# /tmp in RAM: no temporary file ever reaches the SD card
tmpfs            /tmp            tmpfs   defaults,nosuid,nodev,size=128M,mode=1777   0 0
"""

JOURNALD = """\
# SD card: the journal lives in RAM (lost at reboot; the SQLite outbox is the only steady
# writer) and a runaway logger is rate-limited.
[Journal]
Storage=volatile
RuntimeMaxUse=32M
# the journal names students ("present: S001 (name)"): a week at most (docs/PRIVACY.md)
MaxRetentionSec=7day
RateLimitIntervalSec=30s
RateLimitBurst=2000
"""

# systemd pings the hardware watchdog (the Pi's bcm2835_wdt, qemu's i6300esb): a hung kernel or
# PID 1 resets the board. 15 s is the most bcm2835_wdt can count; RebootWatchdogSec bounds a
# reboot that hangs. (The appliance's own WatchdogSec=60 covers a hung pipeline.)
WATCHDOG = """\
[Manager]
RuntimeWatchdogSec=15s
RebootWatchdogSec=2min
"""

# Debian's security suite, installed by unattended-upgrades (in the base root file system; on
# Raspberry Pi OS installed by raspios-firstrun.sh, which writes this same text from the card's
# FAT partition); never rebooting by itself: classroom-reboot.timer reboots outside class time.
# The Raspberry Pi archive (archive.raspberrypi.com) has no security suite of its own: the Pi 5's
# kernel and firmware fixes come only from its one suite, so it is allowed too (the Debian image
# has no such source, so the pattern matches nothing there), with the camera's userland held
# back: the release's venv imports python3-picamera2 from the OS (--system-site-packages), and a
# new picamera2/libcamera would reach the running appliance without a release's trial/revert.
SECURITY_SOURCE = "deb http://security.debian.org/debian-security bookworm-security main\n"
UNATTENDED = """\
// classroom-attendance (fleet/image.py): security updates only; the appliance's own code comes
// as signed releases from the aggregator (docs/OPERATIONS.md 6.10). Debian's own
// 50unattended-upgrades also allows the main suite (point releases): its list is cleared here.
// The Raspberry Pi archive (Raspberry Pi OS only): the Pi's kernel and firmware, which have no
// security suite; the camera's userland is held back (operator's upgrade or a new release).
#clear Unattended-Upgrade::Origins-Pattern;
Unattended-Upgrade::Origins-Pattern {
        "origin=Debian,codename=${distro_codename}-security,label=Debian-Security";
        "origin=Raspberry Pi Foundation,codename=${distro_codename},label=Raspberry Pi Foundation";
};
Unattended-Upgrade::Package-Blacklist {
        "libcamera";
        "python3-libcamera";
        "python3-picamera2";
        "rpicam-apps";
};
Unattended-Upgrade::Automatic-Reboot "false";
Unattended-Upgrade::Remove-Unused-Dependencies "true";
Unattended-Upgrade::MinimalSteps "true";
"""
AUTO_UPGRADES = 'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n'

NETWORK = {
    "20-wired.network": "[Match]\nName=e*\n\n[Network]\nDHCP=yes\n",
    "25-wireless.network": "[Match]\nName=wl*\n\n[Network]\nDHCP=yes\n",
}

SSHD = """\
# Key-only root login (the key comes from `make flash SSH_KEY=...`; make deploy uses it).
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
"""

CONFIG_TXT = """\
# Raspberry Pi 4 (64-bit), Debian kernel with the upstream device trees
arm_64bit=1
enable_uart=1
upstream_kernel=1
kernel=vmlinuz
initramfs initrd.img followkernel
# the USB camera needs no overlay; the Pi camera needs Raspberry Pi OS (make image BASE=...)
"""

CMDLINE = ("console=tty1 console=ttyS1,115200 root=LABEL=rootfs rootfstype=ext4 "
           "rootflags=noatime fsck.repair=yes rootwait net.ifnames=0\n")


# the device trees of the boards this image boots: Pi 4 B, Pi 400, CM4 (the Pi 5 needs Raspberry
# Pi OS, see make image BASE=...; the Pi 3 is not supported: 1 GB of RAM, ~3x slower)
PI_DTBS = "bcm2711-*.dtb"
CHROOT_ENV = {"HOME": "/root", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@contextmanager
def step(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.monotonic()
    _LOGGER.info("step %s ...", name)
    yield
    timings[name] = round(time.monotonic() - start, 1)
    _LOGGER.info("step %s took %.1f s", name, timings[name])


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def configure_root(root: Path, units_dir: Path, *, hostname: str = "classroom-appliance",
                   release_keys: Sequence[Path] = ()) -> None:
    """Files, user and units of the appliance layer (no foreign code runs here).
    ``release_keys``: public keys pulled releases must be signed with (make image
    RELEASE_PUBKEY=...), checked to be ed25519 public keys."""
    _write(root, "etc/fstab", FSTAB)
    _write(root, "etc/systemd/journald.conf.d/50-classroom-sdcard.conf", JOURNALD)
    _write(root, "etc/systemd/system.conf.d/50-classroom-watchdog.conf", WATCHDOG)
    for name, text in NETWORK.items():
        _write(root, f"etc/systemd/network/{name}", text)
    _write(root, "etc/ssh/sshd_config.d/50-classroom.conf", SSHD)
    for source in release_keys:
        key = rm.load_public_key(source.read_bytes())  # a private key or garbage: refused
        _write(root, f"etc/classroom-attendance/release-keys/{rm.key_id(key)}.pub",
               rm.public_pem(key).decode())
    _write(root, "etc/apt/sources.list.d/debian-security.list", SECURITY_SOURCE)
    _write(root, "etc/apt/apt.conf.d/52classroom-unattended-upgrades", UNATTENDED)
    _write(root, "etc/apt/apt.conf.d/20auto-upgrades", AUTO_UPGRADES)
    _write(root, "etc/hostname", hostname + "\n")
    _write(root, "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n"
           "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    # Debian's raspi-firmware hooks write cmdline.txt on a kernel update: keep root by label
    _write(root, "etc/default/raspi-firmware", "ROOTPART=LABEL=rootfs\nCONSOLES=\"tty1\"\n")
    # per card: machine-id made at first boot, SSH host keys by classroom-sshkeys.service
    _write(root, "etc/machine-id", "")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    if subprocess.run(["grep", "-q", f"^{SERVICE_USER}:", str(root / "etc/passwd")],
                      check=False).returncode != 0:
        disk.run(["useradd", "--prefix", str(root), "--system", "--user-group",
                  "--groups", "video", "--home-dir", "/var/lib/classroom-attendance",
                  "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER])
    config = root / "etc/classroom-attendance"
    config.mkdir(parents=True, exist_ok=True)
    config.chmod(0o755)
    # before first boot (or on a card flashed without settings) the appliance still runs,
    # offline, and its status page says what is missing; first boot replaces this file
    conf = config / "appliance.toml"
    conf.write_text("# Replaced by the first boot with the card's settings (make flash).\n"
                    '[web]\nhost = "0.0.0.0"\n')
    conf.chmod(0o600)
    uid, gid = _ids(root, SERVICE_USER)
    os.chown(conf, uid, gid)
    for unit in UNITS:
        shutil.copy2(units_dir / unit, root / "etc/systemd/system" / unit)
    disk.run(["systemctl", f"--root={root}", "enable", *ENABLED])
    (root / "boot/firmware").mkdir(parents=True, exist_ok=True)


def _ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise disk.DiskError(f"user {user} missing in {root}/etc/passwd")


def install_bundle(root: Path, bundle: Path) -> str:
    """Run the bundle's installer inside the arm64 root (chroot, qemu-user via binfmt).

    /sys is deliberately not bind-mounted (XNNPACK would read the x86 host's CPU description
    and crash); the installer needs neither /proc nor /sys."""
    staging = root / "tmp/bundle"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle, staging)
    version = bundle_version(bundle)
    try:
        inside = "/tmp/bundle"  # noqa: S108 (a path inside the image's root, not on this host)
        # a clean environment: nothing of this machine's (PIP_FIND_LINKS, PIP_INDEX_URL, a
        # virtualenv's variables) reaches the image's installer
        disk.run(["chroot", str(root), "/bin/sh", f"{inside}/install-release.sh",
                  inside, "/" + PREFIX], env=CHROOT_ENV)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    current = root / PREFIX / "current"
    if current.is_symlink():
        current.unlink()
    current.symlink_to(f"releases/{version}")
    keep_bundle(bundle, root / PREFIX / "bundles" / version)
    return version


def keep_bundle(bundle: Path, dest: Path) -> None:
    """The installed release's bundle, as the device keeps it (appliance.update): the next
    update reuses its files by sha256 and a revert its units. Without the dependency wheels:
    their exact set is installed (the deps layer), so an update that keeps them needs none."""
    from appliance.update.manager import is_dependency_wheel

    def skip(directory: str, names: list[str]) -> list[str]:
        if Path(directory).name != "wheels":
            return []
        return [n for n in names if is_dependency_wheel(f"wheels/{n}")]

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(bundle, dest, ignore=skip)


def boot_files(root: Path, boot: Path) -> None:
    """The FAT partition's files: Pi firmware, kernel, initramfs, device trees, config."""
    shutil.rmtree(boot, ignore_errors=True)
    boot.mkdir(parents=True)
    for item in sorted((root / "usr/lib/raspi-firmware").glob("*")):
        if item.is_file():
            shutil.copy2(item, boot / item.name)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise disk.DiskError(f"no kernel or initramfs in {root}/boot (base root file system "
                             "incomplete: delete build/cache/rootfs-*.tar and rebuild)")
    shutil.copy2(kernels[-1], boot / "vmlinuz")
    shutil.copy2(initrds[-1], boot / "initrd.img")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    for dtb in sorted((root / f"usr/lib/linux-image-{version}/broadcom").glob(PI_DTBS)):
        shutil.copy2(dtb, boot / dtb.name)
    (boot / "config.txt").write_text(CONFIG_TXT)
    (boot / "cmdline.txt").write_text(CMDLINE)


def tree_bytes(root: Path) -> int:
    out = disk.run(["du", "-s", "--block-size=1", str(root)]).stdout
    return int(out.split()[0])


def compress(image: Path, out: Path) -> None:
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("wb") as fh:
        # -1: on 2 shared cores -3 compressed ~0.3 MB/s of image; -1 is several times faster
        result = subprocess.run(["xz", "-T0", "-1", "-c", str(image)], stdout=fh, check=False)
    if result.returncode != 0:
        raise disk.DiskError("xz failed")
    tmp.rename(out)


def build_image(out: Path, *, base_tar: Path, bundle: Path, units_dir: Path, workdir: Path,
                timings: dict[str, float], release_keys: Sequence[Path] = ()) -> Path:
    """The whole ``make image`` after the cached steps: appliance layer, boot files, assembly."""
    root = workdir / "root"
    with step("extract base root", timings):
        if root.exists():
            disk.run(["rm", "-rf", "--one-file-system", str(root)])
        root.mkdir(parents=True)
        disk.run(["tar", "-x", "-p", "--numeric-owner", "-f", str(base_tar), "-C", str(root)])
    with step("appliance layer", timings):
        configure_root(root, units_dir, release_keys=release_keys)
        install_bundle(root, bundle)
        # the service user's state directory (systemd's StateDirectory= would make it too)
        state = root / "var/lib/classroom-attendance"
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(state, *_ids(root, SERVICE_USER))
    with step("boot files", timings):
        boot_files(root, workdir / "boot")
    with step("assemble", timings):
        used = tree_bytes(root)
        raw = workdir / out.name.removesuffix(".xz")
        disk.assemble(raw, workdir / "boot", root, boot_bytes=BOOT_BYTES,
                      root_bytes=int(used * 1.2) + 384 * disk.MIB, workdir=workdir)
    with step("compress", timings):
        compress(raw, out)
    raw.unlink()
    return out


# --- Raspberry Pi OS Lite ------------------------------------------------------------------------

# Raspberry Pi OS: the installer started once from the kernel command line (as Imager does)
FIRSTRUN = (Path(__file__).resolve().parent.parent / "image_build"
            / "raspios-firstrun.sh").read_text()

RASPIOS_ARGS = (" systemd.run=/boot/firmware/classroom/firstrun.sh "
                "systemd.run_success_action=reboot systemd.unit=kernel-command-line.target")


def write_unattended(stage: Path) -> None:
    """The Debian image's unattended-upgrades policy, beside firstrun.sh (which installs it):
    one text for both kinds of card."""
    (stage / "unattended-upgrades.conf").write_text(UNATTENDED)
    (stage / "auto-upgrades.conf").write_text(AUTO_UPGRADES)


def fat_free_bytes(image: Path, boot: disk.Partition) -> int:
    out = disk.run(["mdir", "-i", disk.fat_spec(image, boot), "::"]).stdout
    for line in out.splitlines():
        if "bytes free" in line:
            # mdir groups digits with spaces (or the locale's separator): keep the digits
            return int(re.sub(r"\D", "", line.split("bytes free")[0]))
    raise disk.DiskError("cannot read the free space of the FAT partition")


def customize_raspios(base: Path, out: Path, *, bundle: Path, workdir: Path,
                      timings: dict[str, float]) -> Path:
    """Raspberry Pi OS Lite + the appliance, without mounting: the bundle and a first-run
    installer go onto the FAT partition, and cmdline.txt starts the installer once."""
    raw = workdir / "raspios.img"
    with step("decompress base", timings):
        disk.run(["sh", "-c", f"xz -dc '{base}' | dd of='{raw}' bs=4M conv=sparse status=none"]
                 if base.suffix == ".xz" else ["cp", "--sparse=always", str(base), str(raw)])
    with step("customise FAT", timings):
        layout = disk.read_layout(raw)
        files = disk.fat_list(raw, layout.boot)
        if "cmdline.txt" not in files:
            raise disk.DiskError(f"{base} has no cmdline.txt on its first partition: not a "
                                 "Raspberry Pi OS image")
        need = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) + disk.MIB
        free = fat_free_bytes(raw, layout.boot)
        if need > free:
            raise disk.DiskError(f"the bundle needs {need / 1e6:.0f} MB on the FAT partition, "
                                 f"which has {free / 1e6:.0f} MB free")
        stage = workdir / FIRSTRUN_DIR
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        shutil.copytree(bundle, stage / "bundle")
        (stage / "firstrun.sh").write_text(FIRSTRUN)
        (stage / "journald.conf").write_text(JOURNALD)
        (stage / "watchdog.conf").write_text(WATCHDOG)
        write_unattended(stage)
        disk.fat_copy_tree(raw, layout.boot, stage, FIRSTRUN_DIR)
        cmdline = disk.fat_read(raw, layout.boot, "cmdline.txt").decode().strip()
        if "systemd.run=" not in cmdline:
            cmdline += RASPIOS_ARGS
        disk.fat_write(raw, layout.boot, "cmdline.txt", (cmdline + "\n").encode(), workdir)
        shutil.rmtree(stage)
    with step("compress", timings):
        compress(raw, out)
    raw.unlink()
    return out
