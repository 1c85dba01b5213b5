"""The aggregator's one settings model (TOML file + ``AGGREGATOR_*`` environment overrides)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from cloud_sync.settings import TomlSettings, load_settings


class AggregatorSettings(TomlSettings):
    """Settings of the central aggregator."""

    model_config = SettingsConfigDict(
        env_prefix="AGGREGATOR_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    database_url: SecretStr = Field(
        default=SecretStr("sqlite:///data/aggregator/aggregator.db"),
        title="Database URL",
        description="SQLAlchemy URL: sqlite:///path.db (default) or "
        "postgresql+psycopg://user@host/db. Masked in `config show` (may hold a password).",
    )
    host: str = Field(
        default="127.0.0.1", title="Bind address", description="Address the API listens on."
    )
    port: int = Field(
        default=8000, ge=1, le=65535, title="Port", description="Port the API listens on."
    )
    data_dir: Path = Field(
        default=Path("data/aggregator"),
        title="Data directory",
        description="Kept photos (only if keep_photos) and other local files.",
    )
    model_dir: Path | None = Field(
        default=None,
        title="Model directory",
        description="Model files for server-side enrollment (default: the fetcher's directory).",
    )
    mqtt_url: SecretStr | None = Field(
        default=None,
        title="MQTT broker URL",
        description="mqtt://user:pass@host:1883 to run the MQTT bridge; unset = HTTP only.",
    )
    mqtt_client_id: str = Field(
        default="aggregator-bridge",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        title="MQTT bridge client id",
        description="Fixed client id of the MQTT bridge; with a persistent session the broker "
        "keeps QoS 1 messages for it while it is down.",
    )
    ha_discovery: bool = Field(
        default=True,
        title="Home Assistant discovery",
        description="Publish Home Assistant MQTT discovery configs and state per room "
        "(only when mqtt_url is set).",
    )
    ha_discovery_prefix: str = Field(
        default="homeassistant",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_/-]+$",
        title="Home Assistant discovery prefix",
        description="Topic prefix Home Assistant listens on for discovery.",
    )
    rate_limit_per_min: int = Field(
        default=100,
        ge=1,
        le=100000,
        title="Device rate limit",
        description="Requests per minute allowed per device before 429.",
    )
    keep_photos: bool = Field(
        default=False,
        title="Keep enrollment photos",
        description="Keep uploaded enrollment photos; by default only the embedding is stored.",
    )
    log_level: str = Field(
        default="INFO",
        pattern="^(DEBUG|INFO|WARNING|ERROR)$",
        title="Log level",
        description="Log level (stdout).",
    )


def load(path: Path | str | None = None, **overrides: object) -> AggregatorSettings:
    return load_settings(AggregatorSettings, path, env_var="AGGREGATOR_CONFIG", **overrides)
