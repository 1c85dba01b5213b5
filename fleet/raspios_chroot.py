"""The Raspberry Pi OS path proven in a chroot: ``raspios-firstrun.sh`` in an arm64 Debian
trixie root shaped like Raspberry Pi OS Lite (image_build/raspios-like-root.sh), under qemu-user.

1. the trixie bundle (CPython 3.13.5, numpy pinned to the OS's) and the first-run installer are
   put where ``make image BASE=...`` puts them (``/boot/firmware/classroom``);
2. ``firstrun.sh`` runs as it does at a Pi's first boot: the ``attendance`` user, the release's
   venv with --system-site-packages (offline, --require-hashes), units enabled, its own
   arguments removed from cmdline.txt, the bundle deleted from the FAT partition;
3. the release's venv imports numpy from the OS (what picamera2's simplejpeg is built against),
   and ``appliance identify`` gives the same students as on this machine (image-test's photos
   and roster);
4. security updates: unattended-upgrades installed from the OS's archive (Debian's mirror
   here), ``apt-config dump`` in the root shows only the allowed origins (Debian's security
   suite, Raspberry Pi's archive) and Automatic-Reboot false, and the units that pull
   releases and reboot outside class time (and apt's own timers) are enabled.

/sys is not bind-mounted (see ../shared/ARM64.md: XNNPACK would read the host's CPUs).
Run: ``python -m fleet.raspios_chroot`` (root; the report in build/image-test/raspios/).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fleet import disk
from fleet.bundle import REPO, build_bundle
from fleet.image import CHROOT_ENV, FIRSTRUN, FIRSTRUN_DIR, JOURNALD, WATCHDOG, write_unattended

_LOGGER = logging.getLogger(__name__)
OUT = REPO / "build" / "image-test" / "raspios"
RELEASE = "/opt/classroom-attendance/current"
# enabled by firstrun.sh (the Debian image's update units where they apply) or by apt's package
UPDATE_UNITS = ("classroom-update.timer", "classroom-update.path", "classroom-reboot.timer",
                "classroom-release-confirm.service", "classroom-unattended-install.service",
                "apt-daily.timer", "apt-daily-upgrade.timer")


def check_security_updates(run: Callable[[str], str]) -> dict[str, object]:
    """unattended-upgrades installed, apt's configuration as the device reads it (only the
    allowed origins, never rebooting by itself, the periodic run on), the units enabled."""
    from fleet.imagetest import ALLOWED_ORIGINS, UNATTENDED_WANTED

    package = run("dpkg-query -W -f='${Status}' unattended-upgrades 2>&1 || true").strip()
    apt = run("apt-config dump").splitlines()
    origins = [ln for ln in apt if ln.startswith("Unattended-Upgrade::Origins-Pattern::")]
    wanted = {line: line in apt for line in UNATTENDED_WANTED}
    states = run(f"systemctl is-enabled {' '.join(UPDATE_UNITS)} || true").split()
    enabled = dict(zip(UPDATE_UNITS, states, strict=False))
    ok = (package == "install ok installed" and origins == list(ALLOWED_ORIGINS)
          and all(wanted.values()) and len(enabled) == len(UPDATE_UNITS)
          and all(v == "enabled" for v in enabled.values()))
    return {"ok": ok, "package": package, "origins": origins, "config": wanted,
            "enabled": enabled}


def base_root(cache: Path = REPO / "build" / "cache") -> Path:
    out = subprocess.run(["bash", str(REPO / "image_build" / "raspios-like-root.sh"),
                          str(cache)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def chroot(root: Path, command: str, timeout: float = 3600) -> str:
    result = subprocess.run(["chroot", str(root), "/bin/bash", "-c", command],
                            capture_output=True, text=True, timeout=timeout, env=CHROOT_ENV,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"chroot: {command[:80]}: {(result.stderr or result.stdout)[-1500:]}")
    return result.stdout


def main() -> int:
    from fleet.imagetest import EXAMPLES, PROBES, build_roster, compare, identify_here

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    report: dict[str, object] = {}
    timings: dict[str, float] = {}
    t = time.monotonic()

    def mark(name: str) -> None:
        nonlocal t
        timings[name] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        _LOGGER.info("%-45s %7.1f s", name, timings[name])

    tarball = base_root()
    mark("Raspberry Pi OS-like trixie root (cached)")
    root = OUT / "root"
    root.mkdir()
    disk.run(["tar", "-x", "-p", "--numeric-owner", "-f", str(tarball), "-C", str(root)])
    bundle = OUT / "bundle"
    build_bundle(bundle, platform="trixie")
    stage = root / "boot/firmware" / FIRSTRUN_DIR
    shutil.copytree(bundle, stage / "bundle")
    (stage / "firstrun.sh").write_text(FIRSTRUN)
    (stage / "journald.conf").write_text(JOURNALD)
    (stage / "watchdog.conf").write_text(WATCHDOG)
    write_unattended(stage)
    # a Pi's first run has its network's resolver; the chroot gets this machine's
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or not resolv.exists():
        resolv.unlink(missing_ok=True)
        shutil.copy2("/etc/resolv.conf", resolv)
    cmdline = root / "boot/firmware/cmdline.txt"
    cmdline.write_text(cmdline.read_text().strip() + " systemd.run=/boot/firmware/classroom/"
                       "firstrun.sh systemd.run_success_action=reboot "
                       "systemd.unit=kernel-command-line.target\n")
    mark("trixie bundle + first-run files on /boot/firmware")
    try:
        for mount in ("proc", "dev"):
            disk.run(["mount", "--bind", f"/{mount}", str(root / mount)])
        report["python"] = chroot(root, "python3 --version").strip()
        report["firstrun"] = chroot(root, "bash /boot/firmware/classroom/firstrun.sh 2>&1 | "
                                    "tail -5").strip()
        mark("firstrun.sh (venv installed offline under qemu-user)")
        report["cmdline_after"] = cmdline.read_text().strip()
        report["bundle_left_on_fat"] = (stage / "bundle").exists()
        report["numpy"] = chroot(root, f"{RELEASE}/bin/python -c 'import numpy, cv2; "
                                 "print(numpy.__version__, numpy.__file__, cv2.__version__)'"
                                 ).strip()
        report["enabled"] = chroot(root, "systemctl is-enabled classroom-appliance "
                                   "classroom-firstboot classroom-console || true").split()
        report["security_updates"] = check_security_updates(lambda c: chroot(root, c))
        mark("unattended-upgrades, apt-config, units checked")
        roster = build_roster(OUT)
        photos = [EXAMPLES / p for p in PROBES]
        here = identify_here(roster, photos)
        probe = root / "root/probe"
        probe.mkdir(parents=True)
        shutil.copy2(roster, probe / "roster.json")
        for photo in photos:
            shutil.copy2(photo, probe / photo.name)
        names = " ".join(f"/root/probe/{p.name}" for p in photos)
        there = json.loads(chroot(root, f"{RELEASE}/bin/appliance identify {names} "
                                  "--roster /root/probe/roster.json --json"))
        mark("identify in the chroot (arm64, qemu-user)")
        rows = compare(here, there)
        report["identify"] = rows
        diffs = [r["diff"] for r in rows if r.get("diff") is not None]
        same = all(r.get("student_x86") == r.get("student_arm64") for r in rows)
        report["passed"] = bool(
            same and diffs and max(diffs) <= 1e-3 and "/usr/lib/python3/dist-packages"
            in str(report["numpy"]) and "systemd.run=" not in str(report["cmdline_after"])
            and not report["bundle_left_on_fat"]
            and report["security_updates"]["ok"])  # type: ignore[index]
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as err:
        report["error"] = str(err)[-2000:]
        report["passed"] = False
    finally:
        for mount in ("dev", "proc"):
            subprocess.run(["umount", "-l", str(root / mount)], check=False)
        report["timings_s"] = timings
        (OUT / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    return 0 if report.get("passed") else 1


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root (chroot, bind mounts)")
    sys.exit(main())
