"""The per-card settings file ``make flash`` writes into the FAT partition and first boot reads.

It holds secrets (the device key, the Wi-Fi passphrase) only until the first boot, which moves
them into /etc/classroom-attendance (0600) and deletes the file from the FAT partition.
"""

from __future__ import annotations

import json
import tomllib
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    StringConstraints,
    model_validator,
)

from cloud_sync.protocol import Identifier

SETTINGS_FILE = "classroom-device.toml"
Hostname = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]


class DeviceSettings(BaseModel):
    """What one card needs to become one classroom's device."""

    model_config = ConfigDict(extra="forbid")

    device_id: Identifier = Field(title="Device id", description="Id registered at the aggregator.")
    room_id: Identifier = Field(title="Room id", description="Room the device is mounted in.")
    aggregator_url: HttpUrl = Field(title="Aggregator URL",
                                    description="Base URL of the aggregator (https://...).")
    device_key: SecretStr = Field(title="Device key", min_length=16, max_length=256,
                                  description="This device's API key, from the aggregator.")
    hostname: Hostname = Field(title="Hostname", description="Network name of the device.")
    wifi_ssid: str | None = Field(default=None, title="Wi-Fi SSID", min_length=1,
                                  max_length=32, description="Wi-Fi network; unset = wired.")
    wifi_psk: SecretStr | None = Field(default=None, title="Wi-Fi passphrase", min_length=8,
                                       max_length=63, description="WPA2 passphrase.")
    wifi_country: str | None = Field(
        default=None, title="Wi-Fi country", pattern=r"^[A-Z]{2}$",
        description="ISO 3166 country code for the Wi-Fi regulatory domain (which channels and "
                    "power the radio may use); required with a Wi-Fi SSID.")
    ntp: list[Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9.:-]{0,252})$")]] = Field(
        default_factory=list, title="NTP servers", max_length=8,
        description="Time servers (names or addresses) the device asks first, e.g. the school's "
                    "own; none = the distribution's pool. A Pi has no real-time clock.")
    ssh_authorized_keys: list[Annotated[str, StringConstraints(
        pattern=r"^(ssh-|ecdsa-|sk-)[^\n]+$", max_length=4096)]] = Field(
        default_factory=list, title="SSH keys", max_length=20,
        description="Public keys allowed to log in as root (for make deploy); none = no SSH.")
    release_keys: list[Annotated[str, StringConstraints(
        pattern=r"^-----BEGIN PUBLIC KEY-----\n[A-Za-z0-9+/=\n]+-----END PUBLIC KEY-----\n?$",
        max_length=1000)]] = Field(
        default_factory=list, title="Release keys", max_length=5,
        description="Public keys (PEM, ed25519) the device's pulled releases must be signed "
                    "with (`aggregator releases keygen`'s .pub); installed into "
                    "/etc/classroom-attendance/release-keys at first boot.")
    camera_source: str | None = Field(default=None, title="Camera source", max_length=512,
                                      description="Overrides camera.source (default: USB 0).")


    @model_validator(mode="after")
    def _country_with_wifi(self) -> DeviceSettings:
        if self.wifi_ssid and not self.wifi_country:
            raise ValueError("wifi_country (WIFI_COUNTRY=, e.g. GB or DE) is required with a "
                             "Wi-Fi SSID: it sets the radio's legal channels and power")
        return self


def _toml_value(value: object) -> str:
    # JSON strings are valid TOML basic strings (same escapes); lists likewise.
    return json.dumps(value)


def dump(settings: DeviceSettings) -> str:
    """The settings as TOML text (secrets in clear: this is the file for the card)."""
    lines = ["# Written by `make flash`; read and deleted by the device's first boot."]
    for name in DeviceSettings.model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif not isinstance(value, (str, list)):
            value = str(value)
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def load(text: str) -> DeviceSettings:
    return DeviceSettings.model_validate(tomllib.loads(text))
