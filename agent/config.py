"""Agent settings from three sources, flags over environment (`FLEETFLOW_*`) over a TOML file. Every error names the
setting and where its value came from (a file's line too). The layering (`layer_settings`) and the value parsers are
shared: the hub's settings (hub/config.py) are read by the same code with their own `SettingsSpec`.

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

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from protocols import is_valid_id

from .keys import KeyFileError, parse_public_key, read_private_text
from .transport import BrokerSettings


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it and its source."""


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
    profiles_dir: Path | None = None
    telemetry_file: str | None = None    # JSON overlay on the psutil figures (tests, demos, simulator)
    shell: bool = False
    shell_allow: tuple[str, ...] = ()
    python: bool = False
    python_allow: tuple[str, ...] = ()

    def broker_settings(self) -> BrokerSettings:
        return BrokerSettings(self.broker, self.username, self.password, self.ca_file, self.cert_file, self.key_file,
                              self.keepalive)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


def _id(value: Any, where: str) -> str:
    if not is_valid_id(value):
        raise ConfigError(f"{where}: {value!r} is not a valid id ([A-Za-z0-9_.-]{{1,64}})")
    return value  # type: ignore[no-any-return]


def _positive_float(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not number > 0:
        raise ConfigError(f"{where}: must be greater than 0, got {value!r}")
    return number


def int_between(low: int, high: int | None = None) -> Callable[[Any, str], int]:
    """A parser of integers in [low, high] (no upper bound if high is None)."""

    def parse(value: Any, where: str) -> int:
        # int() would turn 1.5 into 1 and True into 1: neither is what the operator wrote.
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if number < low or high is not None and number > high:
            wanted = ("a positive integer" if low == 1 and high is None else f"an integer of at least {low}"
                      if high is None else f"an integer from {low} to {high}")
            raise ConfigError(f"{where}: must be {wanted}, got {value!r}")
        return number

    return parse


_positive_int = int_between(1)


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _labels(value: Any, where: str) -> dict[str, str]:
    if isinstance(value, str):  # "k=v,k2=v2" from the environment
        value = [item for item in value.split(",") if item]
    if isinstance(value, (list, tuple)):
        out = {}
        for item in value:
            key, sep, val = str(item).partition("=")
            if not sep:
                raise ConfigError(f"{where}: label {item!r} must be key=value")
            out[key] = val
        value = out
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected key=value labels")
    for key, val in value.items():
        _id(key, f"{where} (label name)")
        if not isinstance(val, str):
            raise ConfigError(f"{where}: label {key} must be a string")
    return dict(value)


def _hub_key(value: Any, where: str) -> bytes:
    try:
        return parse_public_key(_text(value, where))
    except KeyFileError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [item for item in value.split(",") if item]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(value)


def _broker(value: Any, where: str) -> str:
    url = _text(value, where)
    try:
        BrokerSettings(url).parsed()
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if "@" in url.split("//", 1)[-1].split("/", 1)[0]:
        # Credentials in a URL end up in process lists and logs.
        raise ConfigError(f"{where}: put no credentials in the URL; use --username and FLEETFLOW_PASSWORD")
    return url


def _path(value: Any, where: str) -> Path:
    return Path(_text(value, where))


def read_secret_file(path: str | Path, where: str) -> str:
    """A secret (a token) from a file, checked like a key file: a file other users can read is refused, since the
    point of a file over a flag is that nobody else on the machine sees the secret."""
    try:
        text = read_private_text(path, "secret file")
    except KeyFileError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if "\n" in text:
        raise ConfigError(f"{where}: {path} must hold the secret on one line")
    return text


def _secret_file(value: Any, where: str) -> str:
    return read_secret_file(_text(value, where), where)


Parser = Callable[[Any, str], Any]

PARSERS: dict[str, Parser] = {
    "broker": _broker, "fleet": _id, "node_id": _id, "data": _path, "profile": _id, "labels": _labels,
    "hub_key": _hub_key, "trust_first_hub_key": _bool, "username": _text, "password": _text, "ca_file": _text, "cert_file": _text,
    "key_file": _text, "keepalive": _positive_int, "heartbeat": _positive_float, "telemetry": _positive_float,
    "max_concurrent": _positive_int, "grace_period": _positive_float, "outbox_max_bytes": _positive_int,
    "max_step_bytes": _positive_int, "enroll_token": _text, "enroll_token_file": _secret_file, "profiles_dir": _path,
    "telemetry_file": _text, "shell": _bool,
    "shell_allow": _strings, "python": _bool, "python_allow": _strings,
}
REQUIRED = ("broker", "fleet", "node_id", "data")
# Never from a flag: a command line is visible to every user of the machine (ps). Each secret names where it may
# come from instead (the message of a refused flag says so).
SECRET_SOURCES = {"password": "FLEETFLOW_PASSWORD or the config file",
                  "enroll_token": "FLEETFLOW_ENROLL_TOKEN or --enroll-token-file (a file only you can read)"}
# Settings that are read from a file into another setting.
FROM_FILE = {"enroll_token_file": "enroll_token"}


@dataclass(frozen=True)
class SettingsSpec:
    """What one command reads from flags, `FLEETFLOW_*` variables and a TOML file: the agent's and the hub's
    settings are layered by the same code (`layer_settings`), each with its own spec."""

    parsers: Mapping[str, Parser]
    required: tuple[str, ...] = ()
    secret_sources: Mapping[str, str] = field(default_factory=dict)
    from_file: Mapping[str, str] = field(default_factory=dict)
    # TOML tables whose keys are settings named `{table}_{key}` (`enabled` is the setting `{table}` itself).
    tables: tuple[str, ...] = ()


AGENT_SETTINGS = SettingsSpec(PARSERS, REQUIRED, SECRET_SOURCES, FROM_FILE, tables=("shell", "python"))


def _key_lines(text: str) -> dict[str, int]:
    """The line of each `key =` (as `table.key` inside a table), so an error can point into the file; tomllib
    reports lines only for syntax errors."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[\s*([A-Za-z0-9_-]+)\s*\]", line)
        # A key starts its line; a continuation line of a multi-line array or string does not look like one.
        key = re.match(r"""\s*(["']?)([A-Za-z0-9_-]+)\1\s*=""", line)
        if header:
            table = header.group(1)
        elif key:
            lines.setdefault(f"{table}.{key.group(2)}" if table else key.group(2), number)
    return lines


def _from_file(spec: SettingsSpec, path: Path) -> dict[str, tuple[Any, str]]:
    """Each setting of the file with where it is (`config file PATH:LINE`)."""
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    lines = _key_lines(text)

    def at(key: str) -> str:
        return f"config file {path}:{lines[key]}" if key in lines else f"config file {path}"

    out: dict[str, tuple[Any, str]] = {}
    for key, value in raw.items():
        if key in spec.tables and isinstance(value, dict):
            for sub, subvalue in value.items():
                name = key if sub == "enabled" else f"{key}_{sub}"
                if name not in spec.parsers:
                    raise ConfigError(f"{at(f'{key}.{sub}')}: unknown setting [{key}] {sub}")
                out[name] = subvalue, at(f"{key}.{sub}")
        elif key in spec.parsers:
            out[key] = value, at(key)
        else:
            close = difflib.get_close_matches(key, spec.parsers, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(spec.parsers))}"
            raise ConfigError(f"{at(key)}: unknown setting {key!r} ({hint})")
    return out


def _from_env(spec: SettingsSpec, env: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    return {name: (env[f"FLEETFLOW_{name.upper()}"], "environment") for name in spec.parsers
            if f"FLEETFLOW_{name.upper()}" in env}


def layer_settings(spec: SettingsSpec, flags: Mapping[str, Any], config_file: Path | None = None,
                   env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Merge the sources (flags > environment > file), parse every value, and check what is required. A flag left
    unset is None (or empty), so the layers below show through."""
    env = os.environ if env is None else env
    if config_file is None and env.get("FLEETFLOW_CONFIG"):
        config_file = Path(env["FLEETFLOW_CONFIG"])
    layers = [_from_file(spec, config_file) if config_file else {}, _from_env(spec, env),
              {k: (v, "flag") for k, v in flags.items() if v is not None and v != () and v != []}]
    values: dict[str, Any] = {}
    for layer in layers:
        for name, (value, source) in layer.items():
            if name in spec.secret_sources and source == "flag":
                raise ConfigError(f"--{name.replace('_', '-')} is not accepted on the command line (other users "
                                  f"see it in ps); use {spec.secret_sources[name]}")
            where = f"{name} (from {source})" if source != "flag" else f"--{name.replace('_', '-')}"
            if name in spec.from_file:
                if spec.from_file[name] in layer:
                    raise ConfigError(f"{where}: give {spec.from_file[name]} or {name}, not both")
                values[spec.from_file[name]] = spec.parsers[name](value, where)
                continue
            values[name] = spec.parsers[name](value, where)
    missing = [name for name in spec.required if name not in values]
    if missing:
        raise ConfigError("missing setting(s): " + ", ".join(
            f"--{m.replace('_', '-')} (or FLEETFLOW_{m.upper()}, or {m} in the config file)" for m in missing))
    return values


def load_config(flags: Mapping[str, Any], config_file: Path | None = None,
                env: Mapping[str, str] | None = None) -> AgentConfig:
    """The agent's settings from flags > environment > file."""
    values = layer_settings(AGENT_SETTINGS, flags, config_file, env)
    known = {f.name for f in fields(AgentConfig)}
    return AgentConfig(**{k: v for k, v in values.items() if k in known})
