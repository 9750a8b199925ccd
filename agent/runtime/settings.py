"""Settings from three sources, flags over environment (`FLEETFLOW_*`) over a TOML file, for the agent
(agent/config.py) and the hub (hub/config.py) alike: each declares a `SettingsSpec` and `layer_settings` reads it.
Every error names the setting and where its value came from (a file's line too)."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols import FleetflowError, is_valid_id

from .keys import KeyFileError, parse_public_key, read_private_text
from .transport import BrokerSettings


class ConfigError(FleetflowError):
    """A setting is missing or invalid; the message names it and its source."""


def as_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string")
    return value


def as_id(value: Any, where: str) -> str:
    if not is_valid_id(value):
        raise ConfigError(f"{where}: {value!r} is not a valid id ([A-Za-z0-9_.-]{{1,64}})")
    return value


def as_positive_float(value: Any, where: str) -> float:
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


as_positive_int = int_between(1)


def as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def as_strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [item for item in value.split(",") if item]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(value)


def as_broker_url(value: Any, where: str) -> str:
    url = as_text(value, where)
    try:
        BrokerSettings(url).parsed()
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if "@" in url.split("//", 1)[-1].split("/", 1)[0]:
        # Credentials in a URL end up in process lists and logs.
        raise ConfigError(f"{where}: put no credentials in the URL; use --username and FLEETFLOW_PASSWORD")
    return url


def as_path(value: Any, where: str) -> Path:
    return Path(as_text(value, where))


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


def as_secret_file(value: Any, where: str) -> str:
    return read_secret_file(as_text(value, where), where)


def as_labels(value: Any, where: str) -> dict[str, str]:
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
        as_id(key, f"{where} (label name)")
        if not isinstance(val, str):
            raise ConfigError(f"{where}: label {key} must be a string")
    return dict(value)


def as_public_key(value: Any, where: str) -> bytes:
    try:
        return parse_public_key(as_text(value, where))
    except KeyFileError as exc:
        raise ConfigError(f"{where}: {exc}") from None


Parser = Callable[[Any, str], Any]

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
            import difflib  # only a wrong key needs it: kept out of the idle agent's memory

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
