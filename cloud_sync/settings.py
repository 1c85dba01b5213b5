"""Loading typed settings from a TOML file plus environment variables, for both programs.

Precedence, highest first: keyword arguments, environment variables (``PREFIX_SECTION__FIELD``),
the TOML file, the field defaults. A bad value raises :class:`ConfigError` whose message names
every offending field and what is allowed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

S = TypeVar("S", bound=BaseSettings)


class ConfigError(ValueError):
    """The configuration is invalid; the message is meant for the operator."""


class TomlSettings(BaseSettings):
    """Base class: adds the TOML file chosen at load time as a settings source."""

    toml_path: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = cls.toml_path
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(root)"
        given = item.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {field}: {item['msg']}{shown}")
    return "\n".join(lines)


def load_settings(
    cls: type[S], path: Path | str | None = None, env_var: str | None = None, **overrides: Any
) -> S:
    """Build ``cls`` from ``path`` (or the file named by ``env_var``), the environment and
    ``overrides``; raise :class:`ConfigError` with a readable message when a value is bad."""
    if path is None and env_var:
        path = os.environ.get(env_var) or None
    toml_path = Path(path) if path else None
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"configuration file {toml_path} does not exist")
    bound = type(cls.__name__, (cls,), {"toml_path": toml_path, "__module__": cls.__module__})
    try:
        return bound(**overrides)  # type: ignore[return-value]
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(toml_path or "defaults"))) from err
    except (OSError, ValueError) as err:  # TOML syntax errors surface as ValueError
        raise ConfigError(f"cannot read configuration {toml_path}: {err}") from err


def dump_settings(settings: BaseSettings) -> str:
    """The effective settings as JSON, with every secret masked."""
    return json.dumps(settings.model_dump(mode="json"), indent=2, default=str)


def describe_fields(cls: type[BaseSettings]) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every leaf field, for docs and --help."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type, prefix: str) -> None:
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            ann = info.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            rows.append(
                (f"{prefix}{name}", getattr(ann, "__name__", str(ann)), repr(default),
                 info.description or "")
            )

    walk(cls, "")
    return rows
