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
    [artifacts]                      # artifact.install, artifact.rollback (agent/artifacts.py)
    enabled = true
    hub_url = "https://hub.plant1:8470"
    [service]                        # service.restart (agent/services.py)
    enabled = true
    units = ["plant-app.service"]
    supervise = ["demo = python3 app.py --port 8080"]
    [health]                         # health.check (agent/services.py)
    enabled = true
    allow = ["http://127.0.0.1:*", "/usr/bin/curl"]
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .runtime.settings import (ConfigError, Parser, SettingsSpec, as_bool, as_broker_url, as_id, as_labels, as_path,
                               as_positive_float, as_positive_int, as_public_key, as_secret_file, as_strings, as_text,
                               layer_settings)
from protocols.manifest import ARTIFACT_NAME, url_problem

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
    artifacts: bool = False
    artifacts_dir: Path | None = None     # default: DATA/artifacts
    artifacts_hub_url: str | None = None  # the hub's API, which serves GET /artifacts/{sha256}
    artifacts_ca_file: str | None = None  # CA for an https:// hub or mirror (default: the system's)
    artifacts_max_bytes: int = 1 << 30
    service: bool = False
    service_units: tuple[str, ...] = ()      # systemd units service.restart may restart (glob patterns)
    service_supervise: tuple[str, ...] = ()  # "NAME = COMMAND": processes the agent runs from an artifact
    health: bool = False
    health_allow: tuple[str, ...] = ()       # commands (argv[0]) and URLs health.check may probe (glob patterns)

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


def as_http_url(value: Any, where: str) -> str:
    url = as_text(value, where)
    problem = url_problem(url)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    return url.rstrip("/")


def parse_supervised(entry: str) -> tuple[str, list[str]]:
    """`NAME = COMMAND` -> (NAME, argv); ValueError saying what is wrong."""
    name, sep, command = entry.partition("=")
    name = name.strip()
    if not sep or not ARTIFACT_NAME.match(name):
        raise ValueError(f"{entry[:80]!r}: expected NAME = COMMAND, NAME being 1-64 of A-Z a-z 0-9 _ . -")
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"{entry[:80]!r}: {exc}") from None
    if not argv:
        raise ValueError(f"{entry[:80]!r}: the command is empty")
    return name, argv


def as_supervised(value: Any, where: str) -> tuple[str, ...]:
    """`NAME = COMMAND` entries: NAME is the service and the artifact it runs from, COMMAND its argv (shell
    quoting, never a shell)."""
    entries = as_strings(value, where)
    for entry in entries:
        try:
            parse_supervised(entry)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return entries


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
    "artifacts": as_bool, "artifacts_dir": as_path, "artifacts_hub_url": as_http_url, "artifacts_ca_file": as_text,
    "artifacts_max_bytes": as_positive_int, "service": as_bool, "service_units": as_strings,
    "service_supervise": as_supervised, "health": as_bool, "health_allow": as_strings,
}
REQUIRED = ("broker", "fleet", "node_id", "data")
# Never from a flag: a command line is visible to every user of the machine (ps). Each secret names where it may
# come from instead (the message of a refused flag says so).
SECRET_SOURCES = {"password": "FLEETFLOW_PASSWORD or the config file",
                  "enroll_token": "FLEETFLOW_ENROLL_TOKEN or --enroll-token-file (a file only you can read)",
                  "enroll_password": "FLEETFLOW_ENROLL_PASSWORD or the config file"}
# Settings that are read from a file into another setting.
FROM_FILE = {"enroll_token_file": "enroll_token"}
AGENT_SETTINGS = SettingsSpec(PARSERS, REQUIRED, SECRET_SOURCES, FROM_FILE, tables=("shell", "python", "artifacts", "service", "health"))


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
