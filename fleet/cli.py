"""``python -m fleet``: the commands behind make image, make flash and make deploy."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from fleet import disk
from fleet.bundle import REPO, BundleError, build_bundle, release_version
from fleet.lock import LockError

_LOGGER = logging.getLogger(__name__)
app = typer.Typer(help="SD card image, flashing and fleet deploys.", no_args_is_help=True,
                  add_completion=False)
BUILD = REPO / "build"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def image_path(version: str, suffix: str = "") -> Path:
    return BUILD / f"classroom-appliance-{version}{suffix}-arm64.img.xz"


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


@app.command()
def lock(
    target: Annotated[list[str] | None, typer.Option(
        help="bookworm (the Debian image) or trixie (Raspberry Pi OS); default: both.")] = None,
    upgrade: Annotated[bool, typer.Option(
        help="Take the newest releases (otherwise the lock's pins are kept).")] = False,
) -> None:
    """Pin the device's dependencies with hashes per target interpreter (fleet/locks/)."""
    from fleet.lock import TARGETS, LockError, compile_lock
    from fleet.lock import target as find_target

    try:
        for name in target or list(TARGETS):
            typer.echo(compile_lock(find_target(name), upgrade=upgrade))
    except LockError as err:
        raise _fail(err) from err


@app.command()
def bundle(
    out: Annotated[Path, typer.Option(help="Bundle directory to (re)create.")],
    platform: Annotated[str, typer.Option(
        help="bookworm (= arm64, the Debian image), trixie (Raspberry Pi OS) or native (this "
             "machine).")] = "arm64",
) -> None:
    """Build a release bundle: wheels for the platform, the manifest's models, the installer."""
    _setup_logging()
    try:
        build_bundle(out, platform=platform)
    except (BundleError, LockError, OSError) as err:
        raise _fail(err) from err
    typer.echo(out)


@app.command()
def image(
    base: Annotated[Path | None, typer.Option(
        help="A Raspberry Pi OS Lite image (.img or .img.xz) to customise instead.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output .img.xz.")] = None,
    reuse: Annotated[bool, typer.Option(
        help="Keep an existing image of this version (make image-test).")] = False,
    target: Annotated[str | None, typer.Option(
        help="With --base: the Raspberry Pi OS release (trixie, or bookworm for an older "
             "one). Default: trixie with --base, bookworm without.")] = None,
    release_key: Annotated[list[Path] | None, typer.Option(
        envvar="RELEASE_PUBKEY", help="Public key(s) pulled releases must be signed with "
        "(`aggregator releases keygen`'s .pub; never the private key).")] = None,
) -> None:
    """make image: the flashable image (Debian arm64), or a customised Raspberry Pi OS Lite."""
    from fleet.image import build_image, customize_raspios

    _setup_logging()
    release_keys = _release_keys(release_key)
    version = release_version()
    existing = out or image_path(version, "-raspios" if base else "")
    if reuse and existing.exists():
        typer.echo(f"reusing {existing}")
        return
    timings: dict[str, float] = {}
    work = BUILD / "image-work"
    work.mkdir(parents=True, exist_ok=True)
    bundle_dir = work / "bundle"
    start = time.monotonic()
    try:
        t = time.monotonic()
        build_bundle(bundle_dir, platform=target or ("trixie" if base else "bookworm"))
        timings["bundle"] = round(time.monotonic() - t, 1)
        if base is not None:
            target = out or image_path(version, "-raspios")
            customize_raspios(base, target, bundle=bundle_dir, workdir=work, timings=timings)
        else:
            if os.geteuid() != 0:
                raise disk.DiskError("make image needs root: the base system is built by "
                                     "mmdebstrap and the appliance installed in a chroot under "
                                     "qemu-user (run it with sudo)")
            t = time.monotonic()
            tarball = subprocess.run(
                ["bash", str(REPO / "image_build/rootfs.sh"), str(BUILD / "cache")],
                check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
            timings["base root (cached after the first build)"] = round(time.monotonic() - t, 1)
            target = out or image_path(version)
            build_image(target, base_tar=Path(tarball), bundle=bundle_dir,
                        units_dir=REPO / "systemd", workdir=work, timings=timings,
                        release_keys=release_keys)
    except (BundleError, LockError, disk.DiskError, subprocess.CalledProcessError,
            OSError) as err:
        raise _fail(err) from err
    timings["total"] = round(time.monotonic() - start, 1)
    (target.with_name(target.name + ".timings.json")).write_text(json.dumps(timings, indent=2))
    for name, seconds in timings.items():
        typer.echo(f"{name:<45} {seconds:8.1f} s")
    typer.echo(target)


def _release_keys(paths: list[Path] | None) -> list[Path]:
    """The release public keys given, each checked (a private key or garbage: exit 2)."""
    from cloud_sync import release_manifest as rm

    for path in paths or []:
        try:
            rm.load_public_key(path.expanduser().read_bytes())
        except (OSError, rm.ReleaseError) as err:
            typer.echo(f"error: release key {path}: {err} (give release-signing.pub, the "
                       "public key)", err=True)
            raise typer.Exit(2) from err
    return [p.expanduser() for p in paths or []]


def _latest_image() -> Path:
    images = sorted(BUILD.glob("classroom-appliance-*-arm64.img.xz"),
                    key=lambda p: p.stat().st_mtime)
    if not images:
        raise typer.BadParameter("no image in build/: run `make image` or give IMAGE=...")
    return images[-1]


def _admin_token(token_file: Path | None) -> str:
    if token_file is not None:
        return token_file.read_text().strip()
    token = os.environ.get("AGGREGATOR_ADMIN_TOKEN", "").strip()
    if not token:
        raise typer.BadParameter("set AGGREGATOR_ADMIN_TOKEN (or ADMIN_TOKEN_FILE=...): an "
                                 "admin token from `aggregator admin create-token`")
    return token


@app.command()
def flash(
    aggregator: Annotated[str, typer.Option(help="Aggregator base URL (https://...).")],
    room: Annotated[str | None, typer.Option(help="Room id, e.g. LAB-301.")] = None,
    device: Annotated[Path | None, typer.Option(help="The card, e.g. /dev/sdb.")] = None,
    image_only: Annotated[Path | None, typer.Option(help="Write a file instead.")] = None,
    image: Annotated[Path | None, typer.Option(help="Image (default: newest in build/).")] = None,
    device_id: Annotated[str | None, typer.Option(help="Default: pi-<room>.")] = None,
    hostname: Annotated[str | None, typer.Option(help="Default: the device id.")] = None,
    wifi_ssid: Annotated[str | None, typer.Option()] = None,
    wifi_psk: Annotated[str | None, typer.Option(envvar="WIFI_PSK")] = None,
    wifi_country: Annotated[str | None, typer.Option(
        help="ISO country code of the Wi-Fi regulatory domain (required with --wifi-ssid).")
    ] = None,
    ntp: Annotated[str | None, typer.Option(
        help='Time servers, space-separated (e.g. "ntp.school.lan"); default: Debian\'s pool.')
    ] = None,
    ssh_key: Annotated[Path | None, typer.Option(help="Public key file for root login.")] = None,
    camera_source: Annotated[str | None, typer.Option(help="Default: USB camera 0.")] = None,
    devices_csv: Annotated[Path | None, typer.Option(help="Batch: one card per row.")] = None,
    admin_token_file: Annotated[Path | None, typer.Option(
        help="File with the admin token (default: env AGGREGATOR_ADMIN_TOKEN).")] = None,
    admin_url: Annotated[str | None, typer.Option(
        help="Where this machine reaches the admin API, if not at --aggregator.")] = None,
    release_key: Annotated[list[Path] | None, typer.Option(
        envvar="RELEASE_PUBKEY", help="Public key(s) pulled releases must be signed with "
        "(installed at first boot beside the image's).")] = None,
) -> None:
    """make flash: the image plus this card's settings (the device key comes from the API)."""
    from fleet.flash import CardRequest, FlashError, flash_batch, read_csv
    from fleet.flash import flash as flash_one

    _setup_logging()
    token = _admin_token(admin_token_file)
    source = image or _latest_image()
    key = ssh_key.expanduser().read_text() if ssh_key else None
    card = CardRequest(room_id=room or "", device_id=device_id, hostname=hostname,
                       wifi_ssid=wifi_ssid, wifi_psk=wifi_psk, ssh_key=key,
                       camera_source=camera_source,
                       wifi_country=wifi_country.upper() if wifi_country else None,
                       ntp=ntp.split() if ntp else None,
                       release_keys=[p.read_text() for p in _release_keys(release_key)] or None)
    try:
        if devices_csv is not None:
            done = flash_batch(source, read_csv(devices_csv), aggregator=aggregator,
                               admin_token=token, device=device, image_only_dir=image_only,
                               defaults=card, admin_url=admin_url)
            typer.echo(f"{len(done)} card(s) written: {', '.join(done)}")
            return
        if not room:
            raise FlashError("ROOM=... is required (e.g. ROOM=LAB-301)")
        settings = flash_one(source, card, aggregator=aggregator, admin_token=token,
                             device=device, image_only=image_only, admin_url=admin_url)
    except ValidationError as err:
        raise _fail(ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: "
                                         f"{e['msg']}" for e in err.errors()))) from err
    except (FlashError, disk.DiskError) as err:
        raise _fail(err) from err
    typer.echo(f"written {settings.device_id} (room {settings.room_id}, host "
               f"{settings.hostname}) to {device or image_only}")


@app.command()
def deploy(
    hosts: Annotated[str, typer.Option(help='e.g. "pi-lab301 root@10.0.0.7:22".')] = "",
    inventory: Annotated[Path | None, typer.Option(help="TOML inventory of hosts.")] = None,
    version: Annotated[str | None, typer.Option(
        help="Deploy an earlier bundle from build/releases/ (default: build this tree).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=64, help="Hosts at a time.")] = 4,
    health_timeout: Annotated[float, typer.Option(min=5, max=3600)] = 180.0,
    identity: Annotated[Path | None, typer.Option(help="SSH private key.")] = None,
    platform: Annotated[str, typer.Option(help="arm64 or native.")] = "arm64",
) -> None:
    """make deploy: update devices over SSH, roll back any whose health check fails."""
    from fleet.deploy import DeployError, parse_hosts
    from fleet.deploy import deploy as run_deploy

    _setup_logging()
    releases = BUILD / "releases"
    try:
        targets = parse_hosts(hosts, inventory)
        if version:
            bundle_dir = releases / f"{version}-{platform}"
            if not bundle_dir.exists():
                raise DeployError(f"no bundle {bundle_dir}: known: "
                                  + ", ".join(p.name for p in sorted(releases.glob("*"))))
        else:
            bundle_dir = releases / f"{release_version()}-{platform}"
            build_bundle(bundle_dir, platform=platform)
        results = run_deploy(bundle_dir, targets, limit=limit, health_timeout=health_timeout,
                             client_keys=[str(identity)] if identity else None)
    except (DeployError, BundleError, LockError, OSError) as err:
        raise _fail(err) from err
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def main() -> None:
    app()
