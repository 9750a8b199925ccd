"""Hub settings from three sources, flags over environment (`FLEETFLOW_*`) over a TOML file, layered and parsed by
the same code as the agent's (`agent.config.layer_settings`). Every error names the setting and where its value came
from; every setting of `fleetflow hub run` has one name in all three: `--max-pending`, `FLEETFLOW_MAX_PENDING`,
`max_pending = ...`. Secrets (`password`, `enroll_token`) come only from the environment or the file. `HubConfig` is
what the hub process runs with, from these settings (`HubSettings.hub_config`) or built directly (simulator, tests).

    broker = "mqtts://broker.plant1.example:8883"
    fleet = "plant-1"
    data = "/var/lib/fleetflow-hub"
    api = "127.0.0.1:8470"
    ca_file = "/etc/fleetflow/ca.pem"
    username = "hub"
    policy = "/etc/fleetflow/policy.yaml"
    max_workflow_steps = 1000

`hub/install/hub.toml.example` lists every setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.runtime.settings import (ConfigError, Parser, SettingsSpec, as_bool, as_broker_url, as_id, as_path,
                                    as_positive_float, as_positive_int, as_text, int_between, layer_settings,
                                    read_secret_file)
from agent.runtime.transport import BrokerSettings

from .limits import DEFAULT_LIMITS, MAX_DEPTH, Limits
from .registry import DEFAULT_MAX_PENDING, DEFAULT_TOKEN_USES
from .sparkplug.settings import DEFAULT_DEADBAND, DEFAULT_GROUP, SparkplugSettings, check_sparkplug_id, parse_deadband

if TYPE_CHECKING:
    from .broker_acl import BrokerLogin
    from .health import Policy
    from .mirror import MirrorSettings

__all__ = ["ConfigError", "HubConfig", "HubSettings", "HUB_SETTINGS", "load_hub_settings"]

# A proof sniffed off the wire lets anyone try tokens offline, as fast as HMAC runs: only a long random token keeps
# that hopeless.
MIN_ENROLL_TOKEN = 16
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_API = ("127.0.0.1", 8470)
DEFAULT_MIRROR_INTERVAL_S = 1.0   # JSON mirror: one update per node and topic per second at most
MAX_MIRROR_INTERVAL_S = 3600.0
DEFAULT_NODE_METRICS_MAX = 1000  # nodes with per-node gauges (4 series each) at most
DEFAULT_KEEPALIVE_S = 30  # as the agent's (agent/config.py)
MAX_INGEST_WORKERS = 64  # processes on the shared subscription (hub/ingest/); more than the cores only adds switching


def _api(value: Any, where: str) -> tuple[str, int]:
    host, sep, port = as_text(value, where).rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: {value!r}: expected HOST:PORT (port 0: any free port)")
    return host.strip("[]"), int(port)


def _enroll_token(value: Any, where: str) -> str:
    token = as_text(value, where)
    if len(token) < MIN_ENROLL_TOKEN:
        raise ConfigError(f"{where}: the enroll token has {len(token)} characters; use at least {MIN_ENROLL_TOKEN} "
                          f"random ones (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def _enroll_token_file(value: Any, where: str) -> str:
    return _enroll_token(read_secret_file(as_text(value, where), where), where)


def _broker_admin_file(value: Any, where: str) -> BrokerLogin:
    from .broker_acl import BrokerAdminError, read_login_file

    try:
        return read_login_file(as_text(value, where))
    except BrokerAdminError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _log_level(value: Any, where: str) -> str:
    level = as_text(value, where).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{where}: {value!r}: use one of {', '.join(LOG_LEVELS)}")
    return level


def _mirror_interval(value: Any, where: str) -> float:
    seconds = as_positive_float(value, where)
    if seconds > MAX_MIRROR_INTERVAL_S:
        raise ConfigError(f"{where}: at most {MAX_MIRROR_INTERVAL_S:g} seconds, got {value!r}")
    return seconds


def _sparkplug_id(value: Any, where: str) -> str:
    try:
        return check_sparkplug_id(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _deadband(value: Any, where: str) -> dict[str, float]:
    try:
        return parse_deadband(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


PARSERS: dict[str, Parser] = {
    "broker": as_broker_url, "fleet": as_id, "data": as_path, "api": _api, "auto_accept": as_bool,
    "embedded_broker": as_bool,
    "enroll_token": _enroll_token, "enroll_token_file": _enroll_token_file, "enroll_token_uses": as_positive_int,
    "max_pending": as_positive_int, "username": as_text, "password": as_text, "ca_file": as_text, "cert_file": as_text,
    "key_file": as_text, "keepalive": as_positive_int, "policy": as_path, "max_request_bytes": as_positive_int,
    "max_workflow_bytes": as_positive_int,
    "max_workflow_steps": as_positive_int, "max_workflow_depth": int_between(1, MAX_DEPTH),
    "max_workflow_aliases": int_between(0), "max_workflow_nodes": as_positive_int, "log_level": _log_level,
    "json_mirror": as_bool, "json_mirror_interval": _mirror_interval, "node_metrics": as_bool,
    "node_metrics_max": as_positive_int,
    "sparkplug": as_bool, "sparkplug_group": _sparkplug_id, "sparkplug_host": _sparkplug_id,
    "sparkplug_node_id": _sparkplug_id, "sparkplug_deadband": _deadband, "sparkplug_commands": as_bool,
    "broker_admin_file": _broker_admin_file, "ingest_workers": int_between(0, MAX_INGEST_WORKERS),
}
HUB_SETTINGS = SettingsSpec(
    PARSERS, required=("broker", "fleet", "data"),
    secret_sources={"password": "FLEETFLOW_PASSWORD or the config file",
                    "enroll_token": "FLEETFLOW_ENROLL_TOKEN or --enroll-token-file FILE (a file only you can read)"},
    from_file={"enroll_token_file": "enroll_token"},
    tables=("sparkplug",))  # [sparkplug] enabled, group, host, ... in a file: the same as sparkplug_group = ...
# Each limit's setting (the `hub run` option without its dashes) and its field in `Limits`.
LIMIT_SETTINGS = {"max_request_bytes": "request_bytes", "max_workflow_bytes": "workflow_bytes",
                  "max_workflow_steps": "steps", "max_workflow_depth": "depth", "max_workflow_aliases": "aliases",
                  "max_workflow_nodes": "nodes"}


@dataclass(frozen=True)
class HubSettings:
    """Everything `fleetflow hub run` is told; `hub_config` turns it into what the hub process runs with."""

    broker: str
    fleet: str
    data: Path
    api: tuple[str, int] = DEFAULT_API
    auto_accept: bool = False
    embedded_broker: bool = False
    enroll_token: str | None = None
    enroll_token_uses: int = DEFAULT_TOKEN_USES
    max_pending: int = DEFAULT_MAX_PENDING
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = DEFAULT_KEEPALIVE_S
    policy: Path | None = None
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)
    log_level: str = "info"
    json_mirror: bool = False
    json_mirror_interval: float = DEFAULT_MIRROR_INTERVAL_S
    node_metrics: bool = False
    node_metrics_max: int = DEFAULT_NODE_METRICS_MAX
    sparkplug: bool = False
    sparkplug_group: str = DEFAULT_GROUP
    sparkplug_host: str | None = None
    sparkplug_node_id: str | None = None     # None: the fleet id
    sparkplug_deadband: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DEADBAND))
    sparkplug_commands: bool = False
    broker_admin_file: BrokerLogin | None = None  # read from the file: the login the hub manages node logins with
    ingest_workers: int = 0

    def hub_config(self, policy: Policy) -> HubConfig:
        from .mirror import MirrorSettings

        host, port = self.api
        return HubConfig(self.broker, self.fleet, self.data, host, port, self.auto_accept, self.enroll_token,
                         self.enroll_token_uses, self.max_pending, self.username, self.password, self.ca_file,
                         cert_file=self.cert_file, key_file=self.key_file, policy=policy, limits=self.limits,
                         json_mirror=MirrorSettings(self.json_mirror_interval) if self.json_mirror else None,
                         node_metrics=self.node_metrics_max if self.node_metrics else 0,
                         sparkplug=self.sparkplug_settings(), broker_admin=self.broker_admin_file,
                         keepalive=self.keepalive, ingest_workers=self.ingest_workers)

    def sparkplug_settings(self) -> SparkplugSettings | None:
        if not self.sparkplug:
            return None
        return SparkplugSettings(self.sparkplug_group, self.sparkplug_node_id, self.sparkplug_host,
                                 self.sparkplug_deadband, self.sparkplug_commands)


def load_hub_settings(flags: Mapping[str, Any], config_file: Path | None = None,
                      env: Mapping[str, str] | None = None) -> HubSettings:
    """Merge flags > environment (`FLEETFLOW_*`, and `FLEETFLOW_CONFIG` for the file) > file; raises ConfigError."""
    values = layer_settings(HUB_SETTINGS, flags, config_file, env)
    limits = Limits(**{LIMIT_SETTINGS[name]: values.pop(name) for name in list(values) if name in LIMIT_SETTINGS})
    return HubSettings(**values, limits=limits)


def _default_policy() -> Policy:
    # Imported here: the policy's model loads pydantic, which the CLI commands that read these settings do not need.
    from .health import Policy

    return Policy()


@dataclass
class HubConfig:
    """What the hub process (`hub.service.Hub`) runs with: `HubSettings.hub_config` builds it for `hub run`; the
    simulator, tests and benchmarks build it directly."""

    broker: str
    fleet: str
    data: Path
    api_host: str = DEFAULT_API[0]
    api_port: int = DEFAULT_API[1]
    auto_accept: bool = False
    enroll_token: str | None = None
    enroll_token_uses: int = DEFAULT_TOKEN_USES  # enrollments one enroll token may admit, counted durably
    max_pending: int = DEFAULT_MAX_PENDING       # pending enroll requests kept; the oldest is dropped beyond
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    snapshot_every: int = 10_000
    policy: Policy = field(default_factory=_default_policy)
    limits: Limits = field(default_factory=Limits)  # request bodies and workflows (hub/limits.py)
    cert_file: str | None = None  # client certificate and key, for a broker that requires them (mutual TLS)
    key_file: str | None = None
    sparkplug: SparkplugSettings | None = None  # a Sparkplug B edge node with its own MQTT session (hub/sparkplug/)
    json_mirror: MirrorSettings | None = None  # retained JSON copies for platforms without COSE (hub/mirror.py)
    node_metrics: int = 0  # per-node telemetry gauges for at most this many nodes; 0: none (hub/metrics.py)
    broker_admin: BrokerLogin | None = None  # gives accepted nodes broker logins of their own (hub/broker_acl.py)
    # s, of every MQTT session the hub opens; the broker gives up on a silent one after 1.5 x
    keepalive: int = DEFAULT_KEEPALIVE_S
    ingest_workers: int = 0  # processes that verify and decode node messages on a shared subscription (hub/ingest/)

    def broker_settings(self) -> BrokerSettings:
        """One shape for the broker connection: the hub's session, the Sparkplug and JSON mirror sessions."""
        return BrokerSettings(self.broker, self.username, self.password, self.ca_file, self.cert_file, self.key_file,
                              self.keepalive)
