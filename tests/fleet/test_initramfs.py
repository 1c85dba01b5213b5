"""The image's initramfs loads everything the Pi's SD card controller needs, per the DTB.

Read against the kernel the image installs (Debian's current linux-image-arm64, fetched with
apt into the cache once per kernel version): for each Raspberry Pi device tree the image ships,
the SD slot's node and every node it references (supplies, the GPIO expander, clocks, pin
control, parent buses) are mapped to their drivers through the kernel's modules.alias; each
driver that is a module must be in image_build/initramfs-modules (or needed by one that is).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fleet import dtb
from fleet.bundle import REPO
from fleet.debian import kernel_tree
from fleet.image import PI_DTBS
from tests.conftest import require

MODULES_FILE = REPO / "image_build" / "initramfs-modules"
CACHE = REPO / "build" / "cache"


@pytest.fixture(scope="module")
def kernel() -> tuple[Path, dtb.ModuleIndex]:
    require(shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None,
            "apt-get and dpkg-deb are needed to fetch the image's kernel package")
    require(shutil.which("depmod") is not None or Path("/sbin/depmod").exists(),
            "depmod (kmod) is needed to index the kernel's modules (ensure-system-deps.sh test)")
    tree = kernel_tree(CACHE)
    modules = next((tree / "lib/modules").iterdir())
    return tree, dtb.ModuleIndex.load(modules)


def _dtbs(tree: Path) -> list[Path]:
    found = sorted(tree.glob(f"usr/lib/linux-image-*/broadcom/{PI_DTBS}"))
    assert found, "the kernel package ships no Raspberry Pi 4 device tree"
    return found


def test_every_sd_supplier_module_is_in_the_initramfs(kernel) -> None:  # type: ignore[no-untyped-def]
    tree, index = kernel
    listed = dtb.read_module_list(MODULES_FILE)
    for blob_path in _dtbs(tree):
        blob = blob_path.read_bytes()
        needs = dtb.needs(blob, index)
        assert needs, f"{blob_path.name}: no SD card node found"
        gaps = dtb.missing(blob, index, listed)
        assert not gaps, f"{blob_path.name}: the initramfs lacks " + "; ".join(
            f"{'/'.join(sorted(g.modules))} for {g.node} ({g.compatible}, via {g.via})"
            for g in gaps)


def test_the_pi4_needs_its_regulators(kernel) -> None:  # type: ignore[no-untyped-def]
    """The check finds what the old list lacked: the Pi 4's SD supplies are a fixed and a GPIO
    regulator, modules in Debian's kernel, and a list without them fails."""
    tree, index = kernel
    pi4 = next(p for p in _dtbs(tree) if p.name == "bcm2711-rpi-4-b.dtb").read_bytes()
    needs = {n.compatible: n for n in dtb.needs(pi4, index)}
    assert {"brcm,bcm2711-emmc2", "regulator-fixed", "regulator-gpio"} <= set(needs)
    assert "vmmc-supply" in needs["regulator-fixed"].via
    old = dtb.read_module_list(MODULES_FILE) - {"fixed", "gpio_regulator"}
    assert {g.compatible for g in dtb.missing(pi4, index, old)} == {"regulator-fixed",
                                                                    "regulator-gpio"}


def test_listed_modules_exist_in_the_kernel(kernel) -> None:  # type: ignore[no-untyped-def]
    """A misspelt name would make update-initramfs skip it silently (a built-in one is
    harmless: mmc_block and pcie_brcmstb are built in, listed for other kernels)."""
    _, index = kernel
    unknown = sorted(dtb.read_module_list(MODULES_FILE) - set(index.deps) - index.builtin)
    assert not unknown, f"not modules of this kernel: {unknown}"
