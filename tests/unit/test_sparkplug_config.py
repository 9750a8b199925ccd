"""The Sparkplug settings of `hub run`: one name each as a flag, a FLEETFLOW_* variable and a TOML key (or a
[sparkplug] table), ids the specification allows in a topic, deadbands, and the hub config they make."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.config import ConfigError, load_hub_settings
from hub.sparkplug import DEFAULT_DEADBAND, DEFAULT_GROUP, NoBridge, SparkplugSettings, bridge_for
from hub.sparkplug.settings import check_sparkplug_id, parse_deadband

REQUIRED = 'broker = "mqtt://127.0.0.1:1"\nfleet = "plant-1"\ndata = "/tmp/fleetflow-hub-test"\n'


def settings_from(tmp_path: Path, text: str = "", flags: dict | None = None, env: dict | None = None
                  ) -> SparkplugSettings | None:
    file = tmp_path / "hub.toml"
    file.write_text(REQUIRED + text)
    return load_hub_settings(flags or {}, file, env or {}).sparkplug_settings()


def test_off_unless_asked_for(tmp_path: Path) -> None:
    assert settings_from(tmp_path) is None
    assert settings_from(tmp_path, 'sparkplug_group = "g"\n') is None  # settings alone do not turn it on
    assert isinstance(bridge_for(None, None), NoBridge)  # type: ignore[arg-type]  # off: the hooks do nothing


def test_defaults_and_each_source(tmp_path: Path) -> None:
    assert settings_from(tmp_path, "sparkplug = true\n") == SparkplugSettings(DEFAULT_GROUP, None, None,
                                                                              dict(DEFAULT_DEADBAND), False)
    flat = settings_from(tmp_path, 'sparkplug = true\nsparkplug_group = "Plant 1"\nsparkplug_host = "scada"\n'
                                   'sparkplug_node_id = "hub-a"\nsparkplug_commands = true\n'
                                   'sparkplug_deadband = {cpu = 5, temp = 0}\n')
    assert flat == SparkplugSettings("Plant 1", "hub-a", "scada", {**DEFAULT_DEADBAND, "cpu": 5.0, "temp": 0.0}, True)
    table = settings_from(tmp_path, '[sparkplug]\nenabled = true\ngroup = "Plant 1"\nhost = "scada"\n'
                                    'node_id = "hub-a"\ncommands = true\ndeadband = "cpu=5,temp=0"\n')
    assert table == flat
    env = settings_from(tmp_path, env={"FLEETFLOW_SPARKPLUG": "1", "FLEETFLOW_SPARKPLUG_HOST": "h2",
                                       "FLEETFLOW_SPARKPLUG_DEADBAND": "mem=3"})
    assert env is not None and env.host == "h2" and env.deadband["mem"] == 3.0
    flags = settings_from(tmp_path, "sparkplug = false\n", flags={"sparkplug": True, "sparkplug_group": "G"},
                          env={"FLEETFLOW_SPARKPLUG_GROUP": "E"})
    assert flags is not None and flags.group == "G"  # flags over environment over file


@pytest.mark.parametrize("text, says", [
    ('sparkplug_group = "a/b"\n', "sparkplug_group (from config file"),
    ('sparkplug_host = "sc+ada"\n', "'sc+ada' contains '+'"),
    ('sparkplug_node_id = "#"\n', "contains '#'"),
    ('sparkplug_node_id = ""\n', "expected a non-empty string"),
    ('sparkplug_group = "tab\\there"\n', "control characters"),
    ('sparkplug_deadband = "cpu"\n', "expected METRIC=NUMBER"),
    ('sparkplug_deadband = "load1=2"\n', "no telemetry metric 'load1' has a deadband"),
    ('sparkplug_deadband = "cpu=-1"\n', "cpu: expected a number of at least 0"),
    ('sparkplug_deadband = {cpu = true}\n', "cpu: expected a number of at least 0"),
    ('[sparkplug]\nhots = "x"\n', "unknown setting [sparkplug] hots"),
])
def test_bad_values_name_the_setting(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:  # (a [sparkplug] table and a `sparkplug = ` key cannot both be)
        settings_from(tmp_path, ("" if text.startswith("[") else "sparkplug = true\n") + text)
    assert says in str(caught.value)


def test_ids_are_what_a_topic_level_can_hold() -> None:
    assert check_sparkplug_id("Plant 1 — Ligne 2") == "Plant 1 — Ligne 2"  # any UTF-8 but + / #
    for bad in ("a/b", "+", "#", "", "x" * 129, "nul\x00", 7):
        with pytest.raises(ValueError):
            check_sparkplug_id(bad)
    assert parse_deadband("") == DEFAULT_DEADBAND and parse_deadband(" cpu = 0.5 , ")["cpu"] == 0.5


def test_the_hub_config_carries_them(tmp_path: Path) -> None:
    file = tmp_path / "hub.toml"
    file.write_text(REQUIRED + "sparkplug = true\n")
    from hub.health import Policy

    config = load_hub_settings({"sparkplug_host": "scada"}, file, {}).hub_config(Policy())
    assert config.sparkplug == SparkplugSettings(host="scada")
