"""``make flash``: write the image to a card (or a file) and this card's settings into its FAT
partition. The device key comes from the aggregator's admin API (never typed by hand).

Safety: a device is refused when it (or a partition of it) is mounted, when it holds the
running system, when it is smaller than the image, or when it is not a whole block device;
the message says which.
"""

from __future__ import annotations

import csv
import logging
import lzma
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleet import disk
from fleet.settings import SETTINGS_FILE, DeviceSettings, dump

_LOGGER = logging.getLogger(__name__)
CHUNK = 4 * disk.MIB


class FlashError(RuntimeError):
    """Flashing refused or failed; the message is for the technician."""


@dataclass
class CardRequest:
    room_id: str
    device_id: str | None = None
    hostname: str | None = None
    wifi_ssid: str | None = None
    wifi_psk: str | None = None
    ssh_key: str | None = None
    camera_source: str | None = None
    wifi_country: str | None = None
    ntp: list[str] | None = None
    release_keys: list[str] | None = None

    def resolved_id(self) -> str:
        return self.device_id or f"pi-{self.room_id.lower()}"


# --- the aggregator ------------------------------------------------------------------------------

def obtain_device_key(aggregator: str, admin_token: str, device_id: str, room_id: str,
                      *, client: httpx.Client | None = None) -> str:
    """Register the device (or, if it exists, issue it a new key) and return its API key."""
    base = aggregator.rstrip("/")
    own = client is None
    client = client or httpx.Client(timeout=20)
    headers = {"Authorization": f"Bearer {admin_token}"}
    try:
        resp = client.post(f"{base}/api/v1/devices", headers=headers,
                           json={"id": device_id, "room_id": room_id})
        if resp.status_code == 409:
            # A card replaced for an existing device: its old key stops working now.
            _LOGGER.warning("device %s exists at the aggregator: issuing a new key", device_id)
            resp = client.post(f"{base}/api/v1/devices/{device_id}/rotate-key", headers=headers)
    except httpx.HTTPError as err:
        raise FlashError(f"aggregator {base} not reachable: {err}") from err
    finally:
        if own:
            client.close()
    if resp.status_code in (401, 403):
        raise FlashError(f"the aggregator refused the admin token ({resp.status_code}); "
                         "create one with `aggregator admin create-token`")
    if resp.status_code >= 400:
        raise FlashError(f"the aggregator refused device {device_id} in room {room_id} "
                         f"({resp.status_code}): {_detail(resp)}")
    return str(resp.json()["api_key"])


def _detail(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("detail", resp.text))[:300]
    except ValueError:
        return resp.text[:300]


# --- the target ----------------------------------------------------------------------------------

def _lsblk(device: Path) -> list[dict[str, str]]:
    out = disk.run(["lsblk", "-P", "-b", "-o", "NAME,PATH,TYPE,SIZE,MOUNTPOINT,PKNAME",
                    str(device)]).stdout
    rows = []
    for line in out.splitlines():
        fields = dict(part.split("=", 1) for part in line.split('" ') if "=" in part)
        rows.append({k: v.strip('"') for k, v in fields.items()})
    return rows


def _system_disks() -> set[str]:
    """Whole disks holding /, /boot or /boot/firmware of the running system."""
    disks = set()
    for mountpoint in ("/", "/boot", "/boot/firmware", "/usr"):
        src = subprocess.run(["findmnt", "-n", "-o", "SOURCE", mountpoint],
                             capture_output=True, text=True, check=False).stdout.strip()
        if not src.startswith("/dev/"):
            continue
        parent = subprocess.run(["lsblk", "-n", "-o", "PKNAME", src],
                                capture_output=True, text=True, check=False).stdout.strip()
        disks.add(os.path.realpath(f"/dev/{parent}" if parent else src))
    return disks


def check_device(device: Path, image_bytes: int) -> None:
    """Refuse a target that is not a whole disk, is mounted, holds the system or is too small."""
    try:
        mode = device.stat().st_mode
    except FileNotFoundError as err:
        raise FlashError(f"{device} does not exist (is the card reader plugged in?)") from err
    if not stat.S_ISBLK(mode):
        raise FlashError(f"{device} is not a block device; use IMAGE_ONLY=file to write a file")
    rows = _lsblk(device)
    if not rows or rows[0].get("TYPE") != "disk":
        raise FlashError(f"{device} is not a whole disk (give /dev/sdX, not a partition)")
    mounted = [f"{r['PATH']} on {r['MOUNTPOINT']}" for r in rows if r.get("MOUNTPOINT")]
    if mounted:
        raise FlashError(f"{device} is mounted ({', '.join(mounted)}); unmount it first")
    if os.path.realpath(device) in _system_disks():
        raise FlashError(f"{device} holds the running system; refusing to overwrite it")
    size = int(rows[0].get("SIZE") or 0)
    if size < image_bytes:
        raise FlashError(f"{device} is too small: {size / 1e9:.1f} GB < image "
                         f"{image_bytes / 1e9:.1f} GB")


def image_size(image: Path) -> int:
    """Uncompressed size of an .img or .img.xz (xz's index, without decompressing)."""
    if image.suffix != ".xz":
        return image.stat().st_size
    out = disk.run(["xz", "--robot", "--list", str(image)]).stdout
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[0] == "totals":
            return int(fields[4])
    raise FlashError(f"cannot read the size of {image}")


def write_image(image: Path, target: Path, *, device: bool) -> None:
    """Stream the (xz) image onto ``target``; a device is opened exclusively (EBUSY if in use)."""
    flags = os.O_WRONLY | (os.O_EXCL if device else os.O_CREAT | os.O_TRUNC)
    try:
        fd = os.open(target, flags, 0o644)
    except OSError as err:
        raise FlashError(f"cannot open {target} for writing: {err.strerror}") from err
    opener = lzma.open if image.suffix == ".xz" else open
    try:
        with opener(image, "rb") as src:  # type: ignore[operator]
            while block := src.read(CHUNK):
                if not device and block.count(0) != len(block):
                    os.write(fd, block)
                elif not device:
                    os.lseek(fd, len(block), os.SEEK_CUR)  # keep the file sparse
                else:
                    os.write(fd, block)
        if not device:
            os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_CUR))
        os.fsync(fd)
    finally:
        os.close(fd)


def write_settings(target: Path, settings: DeviceSettings) -> None:
    layout = disk.read_layout(target)
    with tempfile.TemporaryDirectory(prefix="flash-") as tmp:
        disk.fat_write(target, layout.boot, SETTINGS_FILE, dump(settings).encode(), Path(tmp))


def flash(image: Path, request: CardRequest, *, aggregator: str, admin_token: str,
          device: Path | None = None, image_only: Path | None = None,
          client: httpx.Client | None = None, admin_url: str | None = None) -> DeviceSettings:
    """One card: checks first, then the key, then the image, then the settings.

    ``aggregator`` is the URL the device will use; ``admin_url`` the one this machine reaches
    the admin API at, when it differs (e.g. a VPN address, or qemu's 10.0.2.2 in image-test).
    """
    if (device is None) == (image_only is None):
        raise FlashError("give exactly one of DEVICE=/dev/sdX or IMAGE_ONLY=out.img")
    if not image.exists():
        raise FlashError(f"image {image} not found; build it with `make image`")
    size = image_size(image)
    if device is not None:
        check_device(device, size)
    device_id = request.resolved_id()
    ssh_keys = [line.strip() for line in (request.ssh_key or "").splitlines() if line.strip()]
    # validate everything except the key before asking the aggregator for one
    draft = dict(device_id=device_id, room_id=request.room_id, aggregator_url=aggregator,
                 hostname=request.hostname or device_id.lower(), wifi_ssid=request.wifi_ssid,
                 wifi_psk=request.wifi_psk, ssh_authorized_keys=ssh_keys,
                 camera_source=request.camera_source, wifi_country=request.wifi_country,
                 ntp=request.ntp or [], release_keys=request.release_keys or [])
    DeviceSettings.model_validate({**draft, "device_key": "x" * 16})
    key = obtain_device_key(admin_url or aggregator, admin_token, device_id, request.room_id,
                            client=client)
    settings = DeviceSettings.model_validate({**draft, "device_key": key})
    target = device or image_only
    assert target is not None
    _LOGGER.info("writing %s to %s", image.name, target)
    write_image(image, target, device=device is not None)
    write_settings(target, settings)
    return settings


def read_csv(path: Path) -> list[CardRequest]:
    """rooms.csv: a header with room_id and optional device_id, hostname, wifi_ssid, wifi_psk,
    wifi_country, ntp (space-separated), ssh_key_file, camera_source."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "room_id" not in rows[0]:
        raise FlashError(f"{path}: needs a header line with at least room_id")
    cards = []
    for row in rows:
        key_file = (row.get("ssh_key_file") or "").strip()
        cards.append(CardRequest(
            room_id=row["room_id"].strip(), device_id=(row.get("device_id") or "").strip() or None,
            hostname=(row.get("hostname") or "").strip() or None,
            wifi_ssid=(row.get("wifi_ssid") or "").strip() or None,
            wifi_psk=(row.get("wifi_psk") or "").strip() or None,
            ssh_key=Path(key_file).expanduser().read_text() if key_file else None,
            camera_source=(row.get("camera_source") or "").strip() or None,
            wifi_country=(row.get("wifi_country") or "").strip().upper() or None,
            ntp=(row.get("ntp") or "").split() or None))
    return cards


def flash_batch(image: Path, cards: list[CardRequest], *, aggregator: str, admin_token: str,
                device: Path | None = None, image_only_dir: Path | None = None,
                prompt: Callable[[str], str] = input, defaults: CardRequest | None = None,
                admin_url: str | None = None, client: httpx.Client | None = None) -> list[str]:
    """A technician's batch: for each row, wait for the next card, flash it, say it is done.

    With ``image_only_dir`` each card becomes a file ``<device id>.img`` there instead."""
    if (device is None) == (image_only_dir is None):
        raise FlashError("a batch needs DEVICE=/dev/sdX (the card reader) or IMAGE_ONLY=dir/")
    where = device or image_only_dir
    done = []
    for index, card in enumerate(cards, 1):
        if defaults is not None:
            for field in ("wifi_ssid", "wifi_psk", "ssh_key", "camera_source", "wifi_country",
                          "ntp"):
                if getattr(card, field) is None:
                    setattr(card, field, getattr(defaults, field))
        answer = prompt(f"[{index}/{len(cards)}] insert the card for {card.room_id} "
                        f"({card.resolved_id()}) into {where}, then press Enter (s = skip, "
                        "q = quit): ").strip().lower()
        if answer == "q":
            break
        if answer == "s":
            continue
        image_only = None
        if image_only_dir is not None:
            image_only_dir.mkdir(parents=True, exist_ok=True)
            image_only = image_only_dir / f"{card.resolved_id()}.img"
        flash(image, card, aggregator=aggregator, admin_token=admin_token, device=device,
              image_only=image_only, admin_url=admin_url, client=client)
        print(f"done: {card.resolved_id()} ({card.room_id}); remove the card")
        done.append(card.resolved_id())
    return done
