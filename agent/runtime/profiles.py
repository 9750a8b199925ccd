"""Firmware profiles: one TOML file per device class, in firmware-profiles/ and the other directories of the search
path.

The schema is declared here, once, with the standard library (a device needs no validation library): the frozen
dataclasses below give every field's name, type, default (none: required), TOML table (`section`) and bounds. The
agent reads a file by those names, types and defaults (`parse_profile`); sim/profiles.py builds its full check from
the same declaration (bounds, unknown keys, threshold order, the name matching the file), for `fleetflow profiles`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypedDict, get_args, get_origin, get_type_hints, is_typeddict

from protocols import FleetflowError, is_valid_id

CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "firmware-profiles"
INSTALLED_DIR = Path(sys.prefix) / "share" / "fleetflow" / "firmware-profiles"  # from pyproject's data-files
SYSTEM_DIR = Path("/etc/fleetflow/profiles")
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class ProfileError(FleetflowError):
    pass


def spec(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, section: str | None = None,
         doc: str = "", **bounds: Any) -> Any:
    """One field of the schema: its default (or `factory`; neither: required), the TOML table it sits in, what it
    means, and its bounds in pydantic's words (gt, ge, le, pattern), which the full check enforces."""
    return field(default=default, default_factory=factory, metadata={"section": section, "doc": doc, "bounds": bounds})


class Threshold(TypedDict):
    """A metric's health thresholds, kept as a plain mapping (the hub's policy reads it so): at or over `high` for
    the policy's duration the node is degraded, at or over `critical` unhealthy; `critical` is not below `high`."""

    high: float
    critical: float


@dataclass(frozen=True, kw_only=True)
class SimBehaviour:
    """How the simulator (sim/) plays a device of this class; a real device ignores it."""

    baseline_cpu: float = spec(20.0, ge=0, le=100, doc="idle CPU %")
    noise: float = spec(5.0, ge=0, doc="CPU noise amplitude, %")
    step_speed: float = spec(1.0, gt=0, doc="multiplier on simulated step durations (slower > 1)")
    failure_rate: float = spec(0.0, ge=0, le=1, doc="chance a simulated step fails")
    boot_time_s: float = spec(1.0, ge=0, doc="seconds from power-on to connecting")
    ambient_c: float = spec(30.0, doc="temperature with no load")
    heat_per_cpu: float = spec(0.4, ge=0, doc="degrees C above ambient per CPU %")
    cooling: float = spec(0.1, gt=0, le=1, doc="fraction of the gap to equilibrium closed per sample")


@dataclass(frozen=True, kw_only=True)
class Profile:
    name: str = spec(pattern=ID_PATTERN, doc="the device class, as the file is named")
    description: str = spec("")
    capabilities: tuple[str, ...] = spec(())
    max_concurrent: int = spec(1, ge=1, le=1024, doc="steps a device runs at once")
    labels: dict[str, str] = spec(factory=dict)  # noqa: RUF009 (spec() is a dataclasses.field)
    cores: float = spec(section="resources", gt=0)
    memory_mb: float = spec(section="resources", gt=0)
    disk_gb: float = spec(section="resources", gt=0)
    heartbeat_s: float = spec(section="intervals", gt=0)
    telemetry_s: float = spec(section="intervals", gt=0)
    thresholds: dict[str, Threshold] = spec(factory=dict)  # noqa: RUF009 (spec() is a dataclasses.field)
    sim: SimBehaviour = spec(factory=SimBehaviour)  # noqa: RUF009 (spec() is a dataclasses.field)

    def resources(self) -> dict[str, float]:
        return {"cores": self.cores, "memory_mb": self.memory_mb, "disk_gb": self.disk_gb}


def search_path(extra: Path | None = None) -> list[Path]:
    dirs = [extra] if extra else []
    if os.environ.get("FLEETFLOW_PROFILES"):
        dirs.append(Path(os.environ["FLEETFLOW_PROFILES"]))
    return [*dirs, CHECKOUT_DIR, INSTALLED_DIR, SYSTEM_DIR]


def available(extra: Path | None = None) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in reversed(search_path(extra)):  # earlier directories win
        if directory.is_dir():
            found.update({p.stem: p for p in sorted(directory.glob("*.toml"))})
    return found


def read_document(path: Path) -> dict[str, Any]:
    """A profile file's TOML, unchecked."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib reads nested arrays and inline tables recursively
        raise ProfileError(f"{path}: not valid TOML: nested too deeply") from None


def parse_profile(path: Path) -> Profile:
    return profile_from_document(read_document(path), path)


def load_profile(name: str, extra: Path | None = None) -> Profile:
    profiles = available(extra)
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; available: {', '.join(sorted(profiles)) or 'none'} "
                           f"(searched {', '.join(str(d) for d in search_path(extra))})")
    return parse_profile(profiles[name])


_KINDS = {float: "a number", int: "an integer", str: "a string", tuple: "a list", dict: "a table"}


class _Problem(Exception):
    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where or 'profile'}: {what}")


def profile_from_document(document: dict[str, Any], path: Path) -> Profile:
    """The profile a TOML document declares, by the schema's names, types and defaults. Values are converted as
    the full check converts them (a number given as a string is a number); unknown keys and bounds are left to it."""
    try:
        profile: Profile = _build(Profile, document, "")
    except _Problem as exc:
        raise ProfileError(f"{path}: {exc}") from None
    if not is_valid_id(profile.name):
        raise ProfileError(f"{path}: name {profile.name!r} is not a valid id")
    return profile


def _build(cls: type[Any], table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise _Problem(where, "expected a table")
    hints = get_type_hints(cls)
    values = {}
    for f in fields(cls):
        section = f.metadata["section"]
        holder = table.get(section, {}) if section else table
        if not isinstance(holder, dict):
            raise _Problem(_at(where, section), "expected a table")
        at = _at(where, f"{section}.{f.name}" if section else f.name)
        if f.name in holder:
            values[f.name] = _convert(hints[f.name], holder[f.name], at)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Problem(at, "required")
    return cls(**values)


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(kind), get_args(kind)
    try:
        if kind in (float, int, str):
            return kind(value)
        if origin is tuple and isinstance(value, list):
            return tuple(_convert(args[0], item, _at(where, str(i))) for i, item in enumerate(value))
        if origin is dict and isinstance(value, dict):
            return {str(k): _convert(args[1], v, _at(where, str(k))) for k, v in value.items()}
        if is_typeddict(kind) and isinstance(value, dict):
            missing = [k for k in get_type_hints(kind) if k not in value]
            if missing:
                raise _Problem(_at(where, missing[0]), "required")
            return {k: _convert(t, value[k], _at(where, k)) for k, t in get_type_hints(kind).items()}
        if is_dataclass(kind):
            return _build(kind, value, where)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf), float(10**400)
        pass
    raise _Problem(where, f"expected {_KINDS.get(origin or kind, 'a table')}, got {value!r}")


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def as_document(value: Any) -> Any:
    """A profile (or a part of one) laid out as its file is, for `fleetflow profiles show` and `list --json`."""
    if is_dataclass(value):
        out: dict[str, Any] = {}
        for f in fields(value):
            section = f.metadata.get("section")
            (out.setdefault(section, {}) if section else out)[f.name] = as_document(getattr(value, f.name))
        return out
    if isinstance(value, tuple):
        return [as_document(v) for v in value]
    if isinstance(value, dict):
        return {k: as_document(v) for k, v in value.items()}
    return value
