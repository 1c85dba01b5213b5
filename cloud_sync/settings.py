"""Loading typed settings from a TOML file plus environment variables, for both programs.

Precedence, highest first: keyword arguments, environment variables (``PREFIX_SECTION__FIELD``),
the TOML file, the field defaults. A bad value raises :class:`ConfigError` whose message names
every offending field and what is allowed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, SecretStr, ValidationError
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


def _check_time_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(
            f"unknown time zone {value!r}: use an IANA name such as Europe/Berlin or UTC"
        ) from err
    return value


TimeZoneName = Annotated[str, AfterValidator(_check_time_zone)]
"""An IANA time zone name, checked when the configuration is loaded (not at run time)."""


def _check_networks(value: str) -> str:
    for item in value.split(","):
        if item.strip():
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError as err:
                raise ValueError(f"not an address or network: {item.strip()!r}") from err
    return value


Networks = Annotated[str, AfterValidator(_check_networks)]
"""Comma-separated IP addresses or CIDR networks (trusted reverse proxies), checked at load."""


def network_list(value: str) -> list[str]:
    """The items of a :data:`Networks` value."""
    return [item.strip() for item in value.split(",") if item.strip()]


def env_var_of(cls: type[BaseSettings], loc: tuple[Any, ...]) -> str | None:
    """The environment variable set for the field at ``loc`` of ``cls``, if any (the settings
    read the environment case-insensitively)."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    delimiter = str(cls.model_config.get("env_nested_delimiter") or "__")
    wanted = (prefix + delimiter.join(str(part) for part in loc)).upper()
    return next((name for name in os.environ if name.upper() == wanted), None)


def _is_secret(cls: type[BaseModel], loc: tuple[Any, ...]) -> bool:
    """Whether the field at ``loc`` holds a secret (its value is never echoed)."""
    model: Any = cls
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", {})
        info = fields.get(part) if isinstance(part, str) else None
        if info is None:
            return False
        model = _section(info.annotation)
    return info is not None and "SecretStr" in str(info.annotation)


def format_validation_error(
    err: ValidationError, source: str, cls: type[BaseSettings] | None = None
) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        loc = tuple(item["loc"])
        field = ".".join(str(part) for part in loc) or "(root)"
        given = item.get("input")
        hidden = isinstance(given, dict) or (cls is not None and _is_secret(cls, loc))
        shown = "" if hidden else f" (got {mask_url_password(repr(given))})"
        var = env_var_of(cls, loc) if cls is not None and loc else None
        origin = f" [from environment variable {var}]" if var else ""
        lines.append(f"  {field}: {item['msg']}{shown}{origin}")
    return "\n".join(lines)


def load_settings(
    cls: type[S], path: Path | str | None = None, env_var: str | None = None, **overrides: Any
) -> S:
    """Build ``cls`` from ``path`` (or the file named by ``env_var``), the environment and
    ``overrides``; raise :class:`ConfigError` with a readable message when a value is bad
    (naming the environment variable when one gave it)."""
    if path is None and env_var:
        path = os.environ.get(env_var) or None
    toml_path = Path(path) if path else None
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"configuration file {toml_path} does not exist")
    bound = type(cls.__name__, (cls,), {"toml_path": toml_path, "__module__": cls.__module__})
    source = f"{toml_path}, environment" if toml_path else "environment and defaults"
    try:
        return bound(**overrides)  # type: ignore[return-value]
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, cls)) from err
    except (OSError, ValueError) as err:  # TOML syntax errors surface as ValueError
        raise ConfigError(f"cannot read configuration {toml_path}: {err}") from err


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*):[^@/\s]+@")


def mask_url_password(text: str) -> str:
    """``rtsp://user:pw@cam/x`` -> ``rtsp://user:***@cam/x``; other text unchanged."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return mask_url_password(value) if isinstance(value, str) else value


def dump_settings(settings: BaseSettings) -> str:
    """The effective settings as JSON, with every secret masked: secret fields entirely, and
    the password of any URL in a plain field (e.g. an RTSP camera URL)."""
    return json.dumps(_mask(settings.model_dump(mode="json")), indent=2, default=str)


def _section(annotation: Any) -> type | None:
    """The model class of a nested settings section, or None for a leaf field."""
    is_model = isinstance(annotation, type) and hasattr(annotation, "model_fields")
    return annotation if is_model else None


def describe_fields(cls: type[BaseSettings]) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every leaf field, for docs and --help."""
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type, prefix: str) -> None:
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            ann = info.annotation
            section = _section(ann)
            if section is not None:
                walk(section, f"{prefix}{name}.")
                continue
            default = info.get_default(call_default_factory=True)
            rows.append(
                (f"{prefix}{name}", getattr(ann, "__name__", str(ann)), repr(default),
                 info.description or "")
            )

    walk(cls, "")
    return rows


def _bounds(info: Any) -> str:
    parts: list[str] = []
    for meta in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            parts.append(f"matches {pattern}")
    args = getattr(info.annotation, "__args__", ())
    if args and all(isinstance(a, str) for a in args):  # Literal[...]
        parts.append("one of " + ", ".join(args))
    return "; ".join(parts)


def _toml_value(value: Any) -> str:
    if isinstance(value, SecretStr):  # a default or an example, never a real secret
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string uses JSON's escapes


def example_toml(
    cls: type[BaseSettings],
    header: str,
    values: dict[str, Any],
    shown_defaults: dict[str, str] | None = None,
) -> str:
    """A TOML file documenting every field of ``cls`` (title, description, bounds, default).

    Keys named in ``values`` (dotted, e.g. ``"device.room_id"``) are set; every other key is
    shown commented out at its default, so the file never drifts from the code's defaults.
    ``shown_defaults`` replaces the shown default of keys whose default depends on where the
    program is installed.
    """
    shown_defaults = shown_defaults or {}
    lines = [f"# {line}".rstrip() for line in header.strip().splitlines()]

    def comment(text: str) -> None:
        lines.extend(textwrap.wrap(text, width=98, initial_indent="# ", subsequent_indent="# "))

    def emit(model: type, prefix: str) -> None:
        nested: list[tuple[str, type]] = []
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            section = _section(info.annotation)
            if section is not None:
                nested.append((name, section))
                continue
            dotted = f"{prefix}{name}"
            lines.append("")
            comment(f"{info.title}: {info.description}" if info.title else info.description)
            bounds = _bounds(info)
            if bounds:
                comment(f"Allowed: {bounds}.")
            if dotted in values:
                lines.append(f"{name} = {_toml_value(values[dotted])}")
                continue
            default = info.get_default(call_default_factory=True)
            shown = "(unset)" if default is None else _toml_value(default)
            shown = shown_defaults.get(dotted, shown)
            lines.append(f"# {name} = {shown}")
        for name, sub in nested:
            lines.append("")
            lines.append(f"[{prefix}{name}]")
            emit(sub, f"{prefix}{name}.")

    emit(cls, "")
    return "\n".join(lines) + "\n"
