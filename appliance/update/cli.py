"""``appliance update ...``: releases on this device (run as root; docs/OPERATIONS.md 6.4, 6.10)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from appliance import config as appliance_config
from cloud_sync.settings import ConfigError

app = typer.Typer(help="Releases on this device: apply, trial, status (root).",
                  no_args_is_help=True)
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: env APPLIANCE_CONFIG)."),
]


def load_settings(path: Path | None) -> appliance_config.ApplianceSettings:
    try:
        return appliance_config.load(path)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _manager(config: Path | None, trial_s: float | None = None):  # type: ignore[no-untyped-def]
    from appliance.update.manager import ReleaseManager
    from appliance.update.reporting import reporter_for

    settings = load_settings(config)
    return ReleaseManager(settings, reporter=reporter_for(settings), trial_s=trial_s)


@app.command("apply")
def apply(
    source: Annotated[Path, typer.Argument(help="A bundle, or make deploy's upload of the "
                                                "files this device lacked.")],
    config: ConfigOption = None,
    unsigned: Annotated[bool, typer.Option(
        "--unsigned", help="Accept a bundle without manifest.sig (make deploy of a lab build); "
        "a signed one is always checked.")] = False,
    detach: Annotated[bool, typer.Option(
        help="Hand the trial to classroom-release-confirm.service and return at once.")] = False,
    trial_s: Annotated[float | None, typer.Option(min=5, max=3600,
                                                  help="Override update.trial_s.")] = None,
) -> None:
    """Verify every file, install beside the current release, switch, and confirm or revert."""
    _logging()
    outcome = _manager(config, trial_s).apply(source, allow_unsigned=unsigned, detach=detach)
    typer.echo(json.dumps({"state": outcome.state, "version": outcome.version,
                           "reason": outcome.reason}))
    if outcome.state not in ("unchanged", "trial", "confirmed"):
        raise typer.Exit(1)


@app.command("confirm")
def confirm(config: ConfigOption = None) -> None:
    """Run (or resume after a reboot) the trial of a pending release: confirm it when healthy,
    else go back to the previous release (classroom-release-confirm.service)."""
    _logging()
    outcome = _manager(config).confirm_pending()
    typer.echo("nothing on trial" if outcome is None else
               json.dumps({"state": outcome.state, "version": outcome.version,
                           "reason": outcome.reason}))


@app.command("status")
def status(config: ConfigOption = None) -> None:
    """Current and previous release, a pending trial and the last report (JSON)."""
    typer.echo(json.dumps(_manager(config).status(), indent=1))


@app.command("need")
def need(
    source: Annotated[Path, typer.Argument(help="Directory holding manifest.json (+ .sig).")],
    config: ConfigOption = None,
) -> None:
    """The files of a release this device has neither in SOURCE nor elsewhere (JSON list of
    paths): what make deploy sends."""
    from cloud_sync import release_manifest as rm

    manager = _manager(config)
    try:
        manifest = rm.parse_manifest((source / rm.MANIFEST).read_bytes())
    except (OSError, rm.ReleaseError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    typer.echo(json.dumps([e.path for e in manager.missing(manifest, source)]))


@app.command("check")
def check(
    config: ConfigOption = None,
    offer: Annotated[str | None, typer.Option(
        help="The heartbeat reply's release (JSON); default: ask the aggregator.")] = None,
    now: Annotated[bool, typer.Option(
        "--now", help="Install even during class time (the rollout's window is ignored).")
    ] = False,
) -> None:
    """Fetch the release the aggregator names for this device, verify every file, install,
    switch, and confirm it when healthy or go back (classroom-update.service)."""
    from appliance.update.manager import UpdateError
    from appliance.update.updater import Updater
    from cloud_sync.protocol import ReleaseOffer

    _logging()
    settings = load_settings(config)
    if not settings.update.enabled:
        typer.echo("pulled updates are off (update.enabled = false)")
        return
    try:
        given = None if offer is None else ReleaseOffer.model_validate_json(offer)
    except ValueError as err:
        typer.echo(f"error: --offer is not a release offer: {err}", err=True)
        raise typer.Exit(2) from err
    try:
        outcome = Updater(settings).check(given, ignore_window=now)
    except UpdateError as err:
        typer.echo(f"error: {err.reason}", err=True)
        raise typer.Exit(1) from err
    typer.echo("nothing to do" if outcome is None else json.dumps(
        {"state": outcome.state, "version": outcome.version, "reason": outcome.reason}))
    if outcome is not None and outcome.state in ("refused", "failed", "reverted"):
        raise typer.Exit(1)


@app.command("watch")
def watch(config: ConfigOption = None) -> None:
    """`check` every update.check_interval_s (a host without systemd's timer)."""
    import time

    _logging()
    settings = load_settings(config)
    while True:
        with contextlib.suppress(typer.Exit):
            check(config=config, offer=None, now=False)
        time.sleep(settings.update.check_interval_s)


@app.command("reboot-if-needed")
def reboot_if_needed(config: ConfigOption = None) -> None:
    """Reboot for a security update (/run/reboot-required) only when no class is in session
    or about to start in this room (classroom-reboot.timer, hourly)."""
    from datetime import UTC, datetime

    from appliance.update.reboot import reboot_if_needed as decide

    _logging()
    typer.echo(decide(load_settings(config), datetime.now(UTC)))
