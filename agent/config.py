"""Agent settings from three sources, flags over environment (`FLEETFLOW_*`) over a TOML file, layered by
agent/runtime/settings.py (which the hub's settings share). Every error names the setting and where its value came
from (a file's line too).

A TOML file uses the same names as the flags (with underscores), plus tables for labels and executors:

    broker = "mqtts://broker.plant1:8883"
    fleet = "plant-1"
    node_id = "press-07"
    data = "/var/lib/fleetflow"
    profile = "rpi4"
    ca_file = "/etc/fleetflow/ca.pem"
    [labels]
    line = "2"
    [shell]
    enabled = true
    allow = ["/usr/bin/systemctl", "/opt/plant/bin/*"]
    [python]
    enabled = false
    allow = []
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .runtime.settings import (ConfigError, Parser, SettingsSpec, as_bool, as_broker_url, as_id, as_labels, as_path,
                               as_positive_float, as_positive_int, as_public_key, as_secret_file, as_strings, as_text,
                               layer_settings)
from .runtime.transport import BrokerSettings

__all__ = ["AGENT_SETTINGS", "AgentConfig", "ConfigError", "load_config"]


@dataclass
class AgentConfig:
    broker: str = ""
    fleet: str = ""
    node_id: str = ""
    data: Path = Path()
    profile: str = "container"
    labels: dict[str, str] = field(default_factory=dict)
    hub_key: bytes | None = None
    trust_first_hub_key: bool = False    # pin the first hub key seen (trust on first use): an explicit choice
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    heartbeat: float | None = None       # seconds; default from the profile
    telemetry: float | None = None       # seconds; default from the profile
    max_concurrent: int | None = None    # default from the profile
    grace_period: float = 30.0           # SIGTERM: time for running steps to finish
    outbox_max_bytes: int = 16 * 1024 * 1024
    max_step_bytes: int = 64 * 1024
    enroll_token: str | None = None
    # The broker login shared by devices not enrolled yet, whose ACL lets them publish enroll requests only. With it,
    # the node logs in as its node id with a password of its own (agent/identity.py), which the hub sets up at the
    # broker when it accepts the node (docs/operations.md, "Least privilege on the broker").
    enroll_username: str | None = None
    enroll_password: str | None = None
    profiles_dir: Path | None = None
    telemetry_file: str | None = None    # JSON overlay on the psutil figures (tests, demos, simulator)
    shell: bool = False
    shell_allow: tuple[str, ...] = ()
    python: bool = False
    python_allow: tuple[str, ...] = ()

    def broker_settings(self) -> BrokerSettings:
        return BrokerSettings(self.broker, self.username, self.password, self.ca_file, self.cert_file, self.key_file,
                              self.keepalive)

    def own_login_settings(self, password: str) -> BrokerSettings:
        """The node's own login (with an enrollment login configured): its node id and its own password."""
        return replace(self.broker_settings(), username=self.node_id, password=password)

    def enroll_login_settings(self) -> BrokerSettings | None:
        if self.enroll_username is None:
            return None
        return replace(self.broker_settings(), username=self.enroll_username, password=self.enroll_password)


PARSERS: dict[str, Parser] = {
    "broker": as_broker_url, "fleet": as_id, "node_id": as_id, "data": as_path, "profile": as_id,
    "labels": as_labels, "hub_key": as_public_key, "trust_first_hub_key": as_bool, "username": as_text,
    "password": as_text, "ca_file": as_text, "cert_file": as_text, "key_file": as_text,
    "keepalive": as_positive_int, "heartbeat": as_positive_float, "telemetry": as_positive_float,
    "max_concurrent": as_positive_int, "grace_period": as_positive_float, "outbox_max_bytes": as_positive_int,
    "max_step_bytes": as_positive_int, "enroll_token": as_text, "enroll_token_file": as_secret_file,
    "enroll_username": as_text, "enroll_password": as_text,
    "profiles_dir": as_path, "telemetry_file": as_text, "shell": as_bool, "shell_allow": as_strings,
    "python": as_bool, "python_allow": as_strings,
}
REQUIRED = ("broker", "fleet", "node_id", "data")
# Never from a flag: a command line is visible to every user of the machine (ps). Each secret names where it may
# come from instead (the message of a refused flag says so).
SECRET_SOURCES = {"password": "FLEETFLOW_PASSWORD or the config file",
                  "enroll_token": "FLEETFLOW_ENROLL_TOKEN or --enroll-token-file (a file only you can read)",
                  "enroll_password": "FLEETFLOW_ENROLL_PASSWORD or the config file"}
# Settings that are read from a file into another setting.
FROM_FILE = {"enroll_token_file": "enroll_token"}
AGENT_SETTINGS = SettingsSpec(PARSERS, REQUIRED, SECRET_SOURCES, FROM_FILE, tables=("shell", "python"))


def load_config(flags: Mapping[str, Any], config_file: Path | None = None,
                env: Mapping[str, str] | None = None) -> AgentConfig:
    """The agent's settings from flags > environment > file."""
    values = layer_settings(AGENT_SETTINGS, flags, config_file, env)
    if values.get("enroll_username") is not None:
        # One login scheme at a time: a node with an enrollment login makes and uses its own password.
        given = [name for name in ("username", "password") if values.get(name) is not None]
        if given:
            raise ConfigError(f"enroll_username: the node logs in as its node id with a password it makes itself; "
                              f"remove {' and '.join(given)}")
        if not values.get("enroll_password"):
            raise ConfigError("enroll_username needs enroll_password (FLEETFLOW_ENROLL_PASSWORD or the config file)")
    known = {f.name for f in fields(AgentConfig)}
    return AgentConfig(**{k: v for k, v in values.items() if k in known})
