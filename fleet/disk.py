"""Disk images without loop devices or mounts: an MBR partition table written with sfdisk, a
FAT partition made with ``mkfs.vfat -C`` and filled with mtools, an ext4 partition made with
``mkfs.ext4 -d`` from a directory, and the parts placed with dd at their offsets.

The layout is Raspberry Pi OS's: a FAT ``bootfs`` partition at sector 8192 (4 MiB), then an
ext4 ``rootfs`` partition, both 4 MiB aligned. mtools reaches a partition inside a whole image
or card with ``-i IMAGE@@OFFSET``, so per-card files are written without extracting anything.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_LOGGER = logging.getLogger(__name__)

SECTOR = 512
MIB = 1 << 20
ALIGN_SECTORS = 8192  # 4 MiB: Raspberry Pi OS's first partition starts here
BOOT_LABEL = "bootfs"
ROOT_LABEL = "rootfs"
FAT_TYPE = "c"  # W95 FAT32 (LBA)
LINUX_TYPE = "83"


class DiskError(RuntimeError):
    """An image or device is not what the tool expects; the message says why."""


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def nbytes(self) -> int:
        return self.size * SECTOR


@dataclass(frozen=True)
class Layout:
    boot: Partition
    root: Partition

    @property
    def total_bytes(self) -> int:
        return (self.root.start + self.root.size) * SECTOR


def _align(sectors: int) -> int:
    return -(-sectors // ALIGN_SECTORS) * ALIGN_SECTORS


def plan_layout(boot_bytes: int, root_bytes: int) -> Layout:
    """Partition 1 (FAT) at sector 8192, partition 2 (ext4) right after it, both 4 MiB aligned."""
    boot_sectors = _align(-(-boot_bytes // SECTOR))
    root_sectors = _align(-(-root_bytes // SECTOR))
    boot = Partition(1, ALIGN_SECTORS, boot_sectors, FAT_TYPE)
    root = Partition(2, _align(boot.start + boot.size), root_sectors, LINUX_TYPE)
    return Layout(boot, root)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a tool; a failure raises :class:`DiskError` with the tool's own message."""
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise DiskError(f"{Path(cmd[0]).name} failed ({result.returncode}): {detail}")
    return result


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not Path("/sbin", t).exists()]
    if missing:
        raise DiskError(
            f"missing tools: {', '.join(missing)}. Fix: apt-get install dosfstools mtools "
            "e2fsprogs fdisk xz-utils (or run `make setup`)."
        )


def make_fat(path: Path, size_bytes: int, label: str = BOOT_LABEL,
             files: Path | None = None) -> None:
    """A FAT32 file system image of ``size_bytes``, filled with the contents of ``files``."""
    path.unlink(missing_ok=True)
    # lower case like Raspberry Pi OS: fstab and udev match labels case-sensitively
    run(["mkfs.vfat", "-C", "-F", "32", "-n", label, str(path), str(size_bytes // 1024)])
    if files is not None:
        entries = sorted(files.iterdir())
        if entries:
            run(["mcopy", "-s", "-p", "-m", "-i", str(path), *map(str, entries), "::"])


def make_ext4(path: Path, size_bytes: int, root: Path, label: str = ROOT_LABEL) -> None:
    """An ext4 image of ``size_bytes`` holding ``root`` (owners and modes as on disk)."""
    path.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0",
         "-d", str(root), str(path), str(size_bytes // 1024) + "k"])


def write_table(image: Path, layout: Layout) -> None:
    """Write an MBR (dos) partition table for ``layout`` into ``image`` (a file or a card)."""
    script = (
        "label: dos\nunit: sectors\n"
        f"start={layout.boot.start}, size={layout.boot.size}, type={layout.boot.type}, bootable\n"
        f"start={layout.root.start}, size={layout.root.size}, type={layout.root.type}\n"
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)], input=script)


def place(image: Path, part_image: Path, partition: Partition) -> None:
    """Copy a partition's file system image to its offset (dd, sparse, no truncation)."""
    if part_image.stat().st_size > partition.nbytes:
        raise DiskError(f"{part_image} is larger than partition {partition.number}")
    run(["dd", f"if={part_image}", f"of={image}", "bs=1M", f"seek={partition.offset // MIB}",
         "conv=notrunc,sparse", "status=none"])


def assemble(image: Path, boot_dir: Path, root_dir: Path, *, boot_bytes: int,
             root_bytes: int, workdir: Path) -> Layout:
    """A complete two-partition disk image from a boot directory and a root directory."""
    require_tools("mkfs.vfat", "mcopy", "mkfs.ext4", "sfdisk", "dd")
    layout = plan_layout(boot_bytes, root_bytes)
    fat = workdir / "bootfs.vfat"
    ext4 = workdir / "rootfs.ext4"
    make_fat(fat, layout.boot.nbytes, files=boot_dir)
    make_ext4(ext4, layout.root.nbytes, root_dir)
    image.unlink(missing_ok=True)
    with image.open("wb") as fh:
        fh.truncate(layout.total_bytes)
    write_table(image, layout)
    place(image, fat, layout.boot)
    place(image, ext4, layout.root)
    fat.unlink()
    ext4.unlink()
    return layout


def read_layout(image: Path) -> Layout:
    """The two partitions of an image or card (FAT first, Linux second), from sfdisk --json."""
    try:
        data = json.loads(run(["sfdisk", "--json", str(image)]).stdout)
    except DiskError as err:
        raise DiskError(f"{image} has no MBR table with a boot and a root partition "
                        f"({err})") from err
    parts = data.get("partitiontable", {}).get("partitions", [])
    if data.get("partitiontable", {}).get("label") != "dos" or len(parts) < 2:
        raise DiskError(f"{image} has no MBR table with a boot and a root partition")
    found = [Partition(i + 1, int(p["start"]), int(p["size"]), str(p["type"]))
             for i, p in enumerate(parts[:2])]
    if found[0].type not in ("b", "c", "e"):
        raise DiskError(f"partition 1 of {image} is not FAT (type {found[0].type})")
    return Layout(found[0], found[1])


def fat_spec(image: Path, boot: Partition) -> str:
    """mtools' name for the FAT partition inside a whole image or card."""
    return f"{image}@@{boot.offset}"


def fat_write(image: Path, boot: Partition, name: str, data: bytes, workdir: Path) -> None:
    """Write one file (``name`` may contain directories) into the FAT partition, in place."""
    local = workdir / Path(name).name
    local.write_bytes(data)
    parts = Path(name).parts
    for depth in range(1, len(parts)):
        sub = "::" + "/".join(parts[:depth])
        probe = subprocess.run(["mdir", "-b", "-i", fat_spec(image, boot), sub],
                               capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            run(["mmd", "-i", fat_spec(image, boot), sub])
    run(["mcopy", "-o", "-i", fat_spec(image, boot), str(local), "::" + name])
    local.unlink()


def fat_copy_tree(image: Path, boot: Partition, src: Path, dest: str) -> None:
    """Copy a directory tree into the FAT partition as ``dest`` (replacing files)."""
    run(["mcopy", "-s", "-o", "-i", fat_spec(image, boot), str(src), "::" + dest])


def fat_read(image: Path, boot: Partition, name: str) -> bytes:
    return subprocess.run(["mcopy", "-n", "-i", fat_spec(image, boot), "::" + name, "-"],
                          capture_output=True, check=True).stdout


def fat_list(image: Path, boot: Partition, directory: str = "") -> list[str]:
    """Names in one directory of the FAT partition (directories without their slash)."""
    out = run(["mdir", "-b", "-i", fat_spec(image, boot), "::" + directory]).stdout
    return sorted(Path(line.strip().rstrip("/")).name for line in out.splitlines()
                  if line.strip())


def fat_label(image: Path, boot: Partition) -> str:
    out = run(["mlabel", "-s", "-i", fat_spec(image, boot), "::"]).stdout
    return out.split("is", 1)[-1].strip()


def extract_partition(image: Path, partition: Partition, dest: Path) -> None:
    run(["dd", f"if={image}", f"of={dest}", "bs=1M", f"skip={partition.offset // MIB}",
         f"count={partition.nbytes // MIB}", "conv=sparse", "status=none"])
