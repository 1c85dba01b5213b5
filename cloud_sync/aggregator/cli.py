"""`aggregator ...`: serve the API and administer the central database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.settings import ConfigError, describe_fields, dump_settings

app = typer.Typer(
    help="Classroom attendance aggregator.", no_args_is_help=True, add_completion=False
)
config_app = typer.Typer(help="Show the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: env AGGREGATOR_CONFIG)."),
]


def load_or_exit(path: Path | None) -> aggregator_config.AggregatorSettings:
    try:
        return aggregator_config.load(path)
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
    for name, kind, default, text in describe_fields(aggregator_config.AggregatorSettings):
        typer.echo(f"{name} ({kind}, default {default}): {text}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
