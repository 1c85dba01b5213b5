"""``<program> config show | example | describe``: the same three commands for the device's
and the aggregator's settings (each program adds its own, e.g. the aggregator's ``check``)."""

# no `from __future__ import annotations`: typer reads the commands' annotations at run time,
# and the --config option's type is local to config_commands

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic_settings import BaseSettings

from cloud_sync.settings import describe_fields, dump_settings


def config_commands(
    model: type[BaseSettings],
    load: Callable[[Path | None], BaseSettings],
    example: Callable[[], str],
    env_var: str,
) -> typer.Typer:
    """A ``config`` command group for ``model``: ``load(path)`` loads the settings (exiting
    with the reason when they are wrong), ``example()`` renders the example TOML."""
    group = typer.Typer(help="Show the configuration.", no_args_is_help=True)
    option = Annotated[
        Path | None,
        typer.Option("--config", "-c", help=f"TOML config file (default: env {env_var})."),
    ]

    @group.command("show")
    def config_show(config: option = None) -> None:
        """Print the effective configuration as JSON, secrets masked."""
        typer.echo(dump_settings(load(config)))

    @group.command("example")
    def config_example() -> None:
        """Print the documented example TOML (every key, its bounds and default)."""
        typer.echo(example(), nl=False)

    @group.command("describe")
    def config_describe() -> None:
        """Print every setting with its type, default and description."""
        for name, kind, default, text in describe_fields(model):
            typer.echo(f"{name} ({kind}, default {default}): {text}")

    return group
