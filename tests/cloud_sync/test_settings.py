"""Typed configuration: TOML + environment, clear errors, secrets masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import config as appliance_config
from cloud_sync.aggregator import config as aggregator_config
from cloud_sync.settings import ConfigError, describe_fields, dump_settings

REPO = Path(__file__).resolve().parents[2]


def test_example_configs_load() -> None:
    a = appliance_config.load(REPO / "config" / "appliance.example.toml")
    assert a.device.room_id
    g = aggregator_config.load(REPO / "config" / "aggregator.example.toml")
    assert g.port > 0


def test_example_configs_are_generated_from_the_models() -> None:
    """The committed examples document every field and never drift from the defaults:
    regenerate with `appliance config example > config/appliance.example.toml` (and the
    aggregator's likewise)."""
    assert (REPO / "config" / "appliance.example.toml").read_text() == appliance_config.example()
    assert (REPO / "config" / "aggregator.example.toml").read_text() == aggregator_config.example()
    text = appliance_config.example()
    for name, _kind, _default, _text in describe_fields(appliance_config.ApplianceSettings):
        assert f"{name.rsplit('.', 1)[-1]} = " in text, name
    assert "# threshold = (unset)" in text and "# Allowed: >= 0.05; <= 1.5." in text
    assert "# embedder = \"sface\"" in text


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.toml"
    path.write_text('[camera]\nsource = "video.mp4"\nfps = 10\n')
    monkeypatch.setenv("APPLIANCE_CAMERA__FPS", "12.5")
    settings = appliance_config.load(path)
    assert settings.camera.source == "video.mp4"
    assert settings.camera.fps == 12.5


def test_bad_value_names_field_and_bound(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[decision]\ndebounce_s = -5\n")
    with pytest.raises(ConfigError) as err:
        appliance_config.load(path)
    assert "decision.debounce_s" in str(err.value)
    assert "greater than or equal to 0" in str(err.value)


def test_unknown_field_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[camera]\nsorce = '0'\n")
    with pytest.raises(ConfigError, match=r"camera.sorce"):
        appliance_config.load(path)


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        appliance_config.load(tmp_path / "nope.toml")


def test_secrets_masked() -> None:
    settings = appliance_config.load(None, sync={"api_key": "super-secret-key",
                                                 "mqtt_url": "mqtt://dev:brokerpw@h:1883"})
    assert "super-secret-key" not in dump_settings(settings)
    assert "brokerpw" not in dump_settings(settings)
    cam = appliance_config.load(None, camera={"source": "rtsp://admin:campw@10.0.0.9:554/s1"})
    shown = json.loads(dump_settings(cam))
    assert shown["camera"]["source"] == "rtsp://admin:***@10.0.0.9:554/s1"
    assert cam.camera.source == "rtsp://admin:campw@10.0.0.9:554/s1"  # only the output is masked
    assert settings.sync.mqtt_url is not None
    assert settings.sync.mqtt_url.get_secret_value() == "mqtt://dev:brokerpw@h:1883"
    agg = aggregator_config.load(None, database_url="postgresql+psycopg://u:pw123@h/db")
    assert "pw123" not in dump_settings(agg)


def test_every_field_is_described() -> None:
    for cls in (appliance_config.ApplianceSettings, aggregator_config.AggregatorSettings):
        for name, _kind, _default, text in describe_fields(cls):
            assert text, f"{cls.__name__}.{name} has no description"


def test_cli_config_show_and_bad_value_exit_code(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent
    shown = subprocess.run([exe / "appliance", "config", "show"], capture_output=True, text=True,
                           check=True)
    assert json.loads(shown.stdout)["device"]["room_id"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[web]\nport = 70000\n")
    result = subprocess.run([exe / "appliance", "config", "show", "--config", bad],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "web.port" in result.stderr
    env = {**os.environ, "AGGREGATOR_DATABASE_URL": "postgresql+psycopg://u:pw9@h/db"}
    agg = subprocess.run([exe / "aggregator", "config", "show"], capture_output=True, text=True,
                         check=True, env=env)
    assert json.loads(agg.stdout)["database_url"] == "**********"
    assert "pw9" not in agg.stdout


def test_aggregator_database_defaults_to_sqlite_in_data_dir(tmp_path: Path) -> None:
    settings = aggregator_config.load(None, data_dir=tmp_path / "agg")
    assert aggregator_config.database_url(settings) == f"sqlite:///{tmp_path}/agg/aggregator.db"
    assert aggregator_config.database_url(aggregator_config.load(None)) == (
        "sqlite:///data/aggregator/aggregator.db")
    pg = aggregator_config.load(None, database_url="postgresql+psycopg://u@h/db")
    assert aggregator_config.database_url(pg) == "postgresql+psycopg://u@h/db"
