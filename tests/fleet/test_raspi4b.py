"""fleet.raspi4b's copy of the Pi 4 device tree for QEMU's raspi4b machine (the card's own DTB
is never changed): the devices QEMU does not emulate, or emulates so that the boot stops, are
disabled, and the console is one that works there. Read against the DTB of the kernel the image
installs (Debian's linux-image-arm64, fetched with apt into the cache, as test_initramfs does)."""

from __future__ import annotations

import shutil
from pathlib import Path

import fdt
import pytest

from fleet import raspi4b
from fleet.bundle import REPO
from fleet.debian import kernel_tree
from tests.conftest import require

CACHE = REPO / "build" / "cache"


@pytest.fixture(scope="module")
def pi4_dtb() -> Path:
    require(shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None,
            "apt-get and dpkg-deb are needed to fetch the image's kernel package")
    found = sorted(kernel_tree(CACHE).glob("usr/lib/linux-image-*/broadcom/bcm2711-rpi-4-b.dtb"))
    assert found, "the kernel package ships no bcm2711-rpi-4-b.dtb"
    return found[0]


def _status(tree: fdt.FDT, compatible: str) -> list[str]:
    out = []
    for path, _nodes, props in tree.walk():
        names = next((list(p.data) for p in props if p.name == "compatible"), [])
        if compatible in names:
            status = tree.get_node(path).get_property("status")
            out.append(status.value if status is not None else "okay")
    return out


def test_qemu_copy_disables_what_stops_the_boot(pi4_dtb: Path, tmp_path: Path) -> None:
    original = fdt.parse_dtb(pi4_dtb.read_bytes())
    # the card's DTB has them all enabled: otherwise this test would prove nothing
    for compatible in ("brcm,bcm2711-l2-intc", "brcm,bcm2835-aux-uart", "brcm,bcm43438-bt"):
        assert _status(original, compatible) and "disabled" not in _status(original, compatible)
    copy = fdt.parse_dtb(raspi4b.qemu_dtb(pi4_dtb, tmp_path / "q.dtb").read_bytes())
    for compatible in raspi4b.NOT_EMULATED:
        found = _status(copy, compatible)
        assert not found or set(found) == {"disabled"}, (compatible, found)
    # the mini UART (ttyS1, the card's console) locked a CPU under QEMU 10.0 and the Bluetooth
    # node made the PL011 a serdev port, not a tty: both off, the PL011 is the console
    assert _status(copy, "brcm,bcm2835-aux-uart") == ["disabled"]
    assert _status(copy, "brcm,bcm43438-bt") == ["disabled"]
    assert "console=ttyAMA0" in raspi4b.EMULATOR_ARGS


def _expander_refs(tree: fdt.FDT) -> list[str]:
    phandles = set()
    for path, _nodes, props in tree.walk():
        names = next((list(p.data) for p in props if p.name == "compatible"), [])
        if raspi4b.EXPANDER in names:
            phandles.add(tree.get_node(path).get_property("phandle").value)
    return [f"{path}:{p.name}" for path, _nodes, props in tree.walk() for p in props
            if (p.name in ("gpio", "gpios") or p.name.endswith("-gpios"))
            and next(iter(p.data), None) in phandles]


def test_qemu_copy_has_no_firmware_expander_gpios(pi4_dtb: Path, tmp_path: Path) -> None:
    """QEMU's firmware model does not answer the expander: the SD supplies and the Wi-Fi
    host's power sequence failed with -EIO and root never appeared. The card's DTB wires them
    to it; the copy wires them to the SoC's GPIO controller instead, so that the same drivers
    (initramfs modules) still bind through GPIOs (without any, gpio-regulator failed)."""
    original = fdt.parse_dtb(pi4_dtb.read_bytes())
    refs = _expander_refs(original)
    assert {"/sd_vcc_reg:gpio", "/sd_io_1v8_reg:gpios", "/wifi-pwrseq:reset-gpios"} <= set(refs)
    copy = fdt.parse_dtb(raspi4b.qemu_dtb(pi4_dtb, tmp_path / "q.dtb").read_bytes())
    assert _expander_refs(copy) == []
    soc = next(copy.get_node(path).get_property("phandle").value
               for path, _n, props in copy.walk() for p in props
               if p.name == "compatible" and raspi4b.SOC_GPIO in list(p.data))
    for node, prop in (("/sd_vcc_reg", "gpio"), ("/sd_io_1v8_reg", "gpios"),
                       ("/wifi-pwrseq", "reset-gpios")):
        cells = list(copy.get_node(node).get_property(prop).data)
        assert cells[0] == soc and cells[1] >= raspi4b.SOC_PIN_BASE, (node, cells)
