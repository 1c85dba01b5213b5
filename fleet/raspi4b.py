"""The image booted the way a Raspberry Pi 4 boots it: QEMU's ``raspi4b`` machine.

``make image-test`` proves the software under ``-M virt`` (virtio disk and NIC, kernel handed
in from outside). This proves the Pi 4's own boot chain on top: the kernel and initramfs with
the image's ``bcm2711-rpi-4-b.dtb`` and ``cmdline.txt`` from the card's FAT partition, root on
the SD card behind the emmc2 controller (its regulators and GPIO expander), the serial console
the cmdline names (ttyS1, the mini UART on GPIO 14/15). QEMU >= 9 has the machine; it runs from
a cached Debian trixie tool root (image_build/toolroot.sh) through that root's own dynamic
loader, so nothing is installed on this machine. The machine has no network: first boot and the
appliance's /health are read on the serial console (``provisioned: ...``,
``classroom-appliance /health: ...``; fleet/console.py).

Run: ``python -m fleet.raspi4b CARD.img [--out DIR]`` (a card written by ``fleet flash``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fleet import disk
from fleet.bundle import REPO

_LOGGER = logging.getLogger(__name__)

FIRSTBOOT_LINE = "provisioned:"
HEALTH_LINE = "classroom-appliance /health:"
# /health answered (fleet.console prints "no answer from ..." otherwise)
HEALTH_ANSWERED = re.compile(r"classroom-appliance /health: (healthy|degraded|unhealthy)")
# QEMU's raspi4b connects its SD card to the Arasan SDHCI (mmc@7e300000, the Pi 4's Wi-Fi host);
# its emmc2 (fe340000, the real Pi 4's card slot) has no card. emmc2 still probes, and only
# once its regulators are bound: from the initramfs, before root is mounted, when the
# initramfs holds them (tests/fleet/test_initramfs.py); after, from the root, when it did not.
EMMC2_PROBED = re.compile(r"mmc\d+: SDHCI controller on fe340000\.mmc")
ROOT_MOUNTED = re.compile(r"EXT4-fs \(mmcblk\d+p2\): mounted")
STUCK = re.compile(r"Gave up waiting for root[^\n]*|Kernel panic[^\n]*|ALERT! [^\n]*")
MILESTONES = {"kernel started": re.compile(r"Booting Linux"),
              "emmc2 probed (its regulators bound)": EMMC2_PROBED,
              "root on the SD card": ROOT_MOUNTED,
              "first boot on the console": re.compile(r"provisioned: (True|False)"),
              "/health on the console": HEALTH_ANSWERED}


def toolroot(cache: Path = REPO / "build" / "cache") -> Path:
    """The trixie tool root with qemu-system-aarch64 (built once, cached)."""
    out = subprocess.run(["bash", str(REPO / "image_build" / "toolroot.sh"), str(cache)],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def qemu_command(root: Path) -> tuple[list[str], dict[str, str]]:
    """qemu-system-aarch64 of the tool root, run through the root's own loader and libraries."""
    loader = next((p for p in (root / "usr/lib64/ld-linux-x86-64.so.2",
                               root / "lib64/ld-linux-x86-64.so.2") if p.exists()), None)
    if loader is None:
        raise FileNotFoundError(f"{root}: no ld-linux-x86-64.so.2 (tool root incomplete)")
    libs = ":".join(str(root / d) for d in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu",
                                           "usr/lib/x86_64-linux-gnu/pulseaudio"))
    env = {**os.environ, "QEMU_MODULE_DIR": str(root / "usr/lib/x86_64-linux-gnu/qemu")}
    return [str(loader), "--library-path", libs, str(root / "usr/bin/qemu-system-aarch64"),
            "-L", str(root / "usr/share/qemu")], env


def prepare(card: Path, out: Path) -> dict[str, Path | str]:
    """The boot files out of the card's FAT partition, and the card padded to a power of two
    (QEMU's SD card model refuses other sizes; first boot grows root into the rest)."""
    layout = disk.read_layout(card)
    files: dict[str, Path | str] = {}
    for name in ("vmlinuz", "initrd.img", "bcm2711-rpi-4-b.dtb", "cmdline.txt"):
        path = out / name
        path.write_bytes(disk.fat_read(card, layout.boot, name))
        files[name] = path
    files["cmdline"] = (out / "cmdline.txt").read_text().strip()
    files["dtb"] = qemu_dtb(out / "bcm2711-rpi-4-b.dtb", out / "bcm2711-rpi-4-b.qemu.dtb")
    size = card.stat().st_size
    target = 1 << max(size - 1, 1).bit_length()
    with card.open("r+b") as fh:
        fh.truncate(target)
    return files


# Devices of the BCM2711 that QEMU's raspi4b does not emulate, beyond those QEMU itself removes
# from the DTB (PCIe, RNG, thermal, GENET): the HDMI block at 0x7ef00000 (its clock, L2
# interrupt controller, the two HDMI and their DDC I2C controllers). Debian's kernel stopped
# with "synchronous external abort" in brcmstb_l2_intc_of_init at 2.9 s, then (with that one
# disabled) in brcmstb_i2c_probe at 4.4 s (QEMU 10.0.13), before any initramfs.
# Disabled in a copy of the card's DTB, as QEMU does with the others; the card is not changed.
NOT_EMULATED = ("brcm,brcm2711-dvp", "brcm,bcm2711-l2-intc", "brcm,bcm2711-hdmi0",
                "brcm,bcm2711-hdmi1", "brcm,bcm2711-hdmi-i2c",
                # the mini UART: emulated, but its interrupt locks a CPU (EMULATOR_ARGS)
                "brcm,bcm2835-aux-uart",
                # the Bluetooth chip on the PL011 (QEMU has no radio): while it is there, the
                # PL011 belongs to serdev and is no tty, and it is the console here
                "brcm,bcm43438-bt")


# Added to the card's command line for QEMU only: an early console on the PL011, and the PL011
# (ttyAMA0, serial0.log) as the console, since the mini UART (ttyS1) is disabled in the DTB copy
# (NOT_EMULATED). With it, Debian's kernel reached the initramfs ("Run /init as init process" at
# 3.7 s) and went no further: the CPU taking the mini UART's interrupt was stuck from the moment
# a program opened the console ("soft lockup - CPU#0 stuck for 27s!", PID 1 in
# __setup_irq <- serial8250_do_startup <- tty_open with nosmp; in arch_cpu_idle with four
# cores), repeating until the time-out: as far as the traces show, an interrupt of QEMU 10.0's
# bcm2835 aux UART that is never cleared.
# systemd.watchdog_sec=0: the image arms the Pi's bcm2835 watchdog for 15 s (its maximum), which
# QEMU emulates; emulated PID 1 stalled longer than that under load and the guest was reset
# (a silent reboot at 62 s, qemu -no-reboot exited). The watchdog is proven in image-test's
# virt guest (i6300esb, 120 s); here it is off.
EMULATOR_ARGS = ("earlycon=pl011,mmio32,0xfe201000 console=ttyAMA0,115200 "
                 "systemd.watchdog_sec=0")


# The Pi 4's GPIO expander is driven through the firmware's mailbox (raspberrypi-exp-gpio);
# QEMU 10.0's raspi4b firmware model does not answer its GPIO properties ("Failed to get GPIO 6
# config (0 86)"), so everything wired to it failed with -EIO: the SD card's supplies
# (reg-fixed-voltage sd_vcc_reg, gpio-regulator sd_io_1v8_reg) and the Wi-Fi host's power
# sequence (pwrseq_simple: the Arasan SDHCI, where QEMU puts the card, never probed), and
# initramfs-tools gave up waiting for root. In the copy, expander pin N becomes the SoC's GPIO
# 22 + N (header pins 22-29, unused here; QEMU emulates that controller): the same drivers
# (modules that must be in the initramfs) bind the same way, through GPIOs that answer.
# (Deleting the references instead failed: gpio-regulator without gpios, -ENOMEM.)
EXPANDER = "raspberrypi,firmware-gpio"
SOC_GPIO = "brcm,bcm2711-gpio"
SOC_PIN_BASE = 22


def qemu_dtb(src: Path, dest: Path) -> Path:
    import fdt

    tree = fdt.parse_dtb(src.read_bytes())
    nodes = [tree.root]
    for _path, children, _props in tree.walk():
        nodes.extend(children)
    phandles: dict[str, int] = {}
    for node in nodes:
        prop = node.get_property("compatible")
        names = list(getattr(prop, "data", [])) if prop is not None else []
        if any(n in NOT_EMULATED for n in names):
            node.set_property("status", "disabled")
        for kind in (EXPANDER, SOC_GPIO):
            if kind in names and node.get_property("phandle") is not None:
                phandles[kind] = node.get_property("phandle").value
    if EXPANDER in phandles and SOC_GPIO in phandles:
        for node in nodes:
            for prop in list(node.props):
                if not (prop.name in ("gpio", "gpios") or prop.name.endswith("-gpios")):
                    continue
                cells = list(getattr(prop, "data", []))
                if len(cells) % 3 or phandles[EXPANDER] not in cells[0::3]:
                    continue
                for i in range(0, len(cells), 3):  # <&phandle pin flags> (#gpio-cells = 2)
                    if cells[i] == phandles[EXPANDER]:
                        cells[i:i + 2] = [phandles[SOC_GPIO], SOC_PIN_BASE + cells[i + 1]]
                node.set_property(prop.name, cells)
    dest.write_bytes(tree.to_dtb(version=17))
    return dest


def console_text(out: Path) -> str:
    text = ""
    for name in ("serial0.log", "serial1.log"):
        with contextlib.suppress(OSError):
            text += (out / name).read_bytes().decode(errors="replace").replace("\r", "")
    return text


def boot(card: Path, out: Path, *, tools: Path, timeout: float = 3600) -> dict[str, object]:
    """Boot ``card`` in -M raspi4b until first boot and /health printed their lines."""
    out.mkdir(parents=True, exist_ok=True)
    files = prepare(card, out)
    base, env = qemu_command(tools)
    version = subprocess.run([*base, "--version"], capture_output=True, text=True, env=env,
                             check=False).stdout.splitlines()[:1]
    cmd = [*base, "-M", "raspi4b", "-kernel", str(files["vmlinuz"]),
           "-initrd", str(files["initrd.img"]), "-dtb", str(files["dtb"]),
           # the card's cmdline.txt, plus an early console on the PL011 (serial0) so that a
           # kernel that stops before its serial driver binds still says where, and the PL011
           # as the console (EMULATOR_ARGS)
           "-append", f"{files['cmdline']} {EMULATOR_ARGS}",
           "-drive", f"file={card},format=raw,if=sd",
           # serial0: the PL011 (Bluetooth on a Pi 4), serial1: the mini UART = ttyS1, the
           # console cmdline.txt names (GPIO 14/15 on the real board)
           "-serial", f"file:{out / 'serial0.log'}", "-serial", f"file:{out / 'serial1.log'}",
           "-display", "none", "-monitor", "none", "-no-reboot"]
    result: dict[str, object] = {"qemu": version[0] if version else "?",
                                 "cmdline": files["cmdline"], "milestones_s": {}}
    start = time.monotonic()
    milestones: dict[str, float] = {}
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                            stdout=(out / "qemu.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        while time.monotonic() - start < timeout:
            text = console_text(out)
            for name, marker in MILESTONES.items():
                if name not in milestones and marker.search(text):
                    milestones[name] = round(time.monotonic() - start, 1)
                    _LOGGER.info("raspi4b: %-28s %7.1f s", name, milestones[name])
            if len(milestones) == len(MILESTONES):
                break
            stuck = STUCK.search(text)
            if stuck:  # root never appeared: initramfs-tools gave up (its shell) or a panic
                result["error"] = f"boot stopped: {stuck.group(0)}"
                break
            if proc.poll() is not None:
                qemu_log = (out / "qemu.log").read_text(errors="replace")[-2000:]
                result["error"] = f"qemu exited with {proc.returncode}: {qemu_log}"
                break
            time.sleep(2)
        else:
            result["error"] = f"not all milestones within {timeout:.0f} s"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    text = console_text(out)
    result["milestones_s"] = milestones
    result["console_lines"] = [ln for ln in text.splitlines()
                               if FIRSTBOOT_LINE in ln or HEALTH_LINE in ln][:6]
    emmc2, root = EMMC2_PROBED.search(text), ROOT_MOUNTED.search(text)
    result["emmc2_probed_before_root"] = bool(emmc2 and root and emmc2.start() < root.start())
    result["passed"] = (len(milestones) == len(MILESTONES) and "error" not in result
                        and result["emmc2_probed_before_root"])
    if not result["passed"]:
        result["console_tail"] = text.splitlines()[-40:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "image-test" / "raspi4b")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shutil.rmtree(args.out, ignore_errors=True)
    result = boot(args.card, args.out, tools=toolroot(), timeout=args.timeout)
    (args.out / "report.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
