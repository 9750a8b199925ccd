"""Firmware profiles as the agent reads them: TOML files in firmware-profiles/, read with the standard library so
a device needs no validation library. (The simulator and hub validate the same files fully.)
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols import is_valid_id

CHECKOUT_DIR = Path(__file__).resolve().parents[1] / "firmware-profiles"
INSTALLED_DIR = Path(sys.prefix) / "share" / "fleetflow" / "firmware-profiles"  # from pyproject's data-files
SYSTEM_DIR = Path("/etc/fleetflow/profiles")


class ProfileError(Exception):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    cores: float = 1.0
    memory_mb: float = 512.0
    disk_gb: float = 4.0
    capabilities: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_s: float = 5.0
    telemetry_s: float = 10.0
    max_concurrent: int = 1
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    sim: dict[str, Any] = field(default_factory=dict)

    def resources(self) -> dict[str, float]:
        return {"cores": float(self.cores), "memory_mb": float(self.memory_mb), "disk_gb": float(self.disk_gb)}


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


def parse_profile(path: Path) -> Profile:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"profile {path}: {exc}") from None
    name = raw.get("name", path.stem)
    if not is_valid_id(name):
        raise ProfileError(f"profile {path}: name {name!r} is not a valid id")
    resources = raw.get("resources", {})
    intervals = raw.get("intervals", {})
    try:
        return Profile(
            name=name, description=str(raw.get("description", "")),
            cores=float(resources.get("cores", 1)), memory_mb=float(resources.get("memory_mb", 512)),
            disk_gb=float(resources.get("disk_gb", 4)),
            capabilities=tuple(str(c) for c in raw.get("capabilities", [])),
            labels={str(k): str(v) for k, v in raw.get("labels", {}).items()},
            heartbeat_s=float(intervals.get("heartbeat_s", 5)), telemetry_s=float(intervals.get("telemetry_s", 10)),
            max_concurrent=int(raw.get("max_concurrent", 1)),
            thresholds={str(k): {str(a): float(b) for a, b in v.items()} for k, v in raw.get("thresholds", {}).items()},
            sim=dict(raw.get("sim", {})))
    except (TypeError, ValueError, AttributeError) as exc:
        raise ProfileError(f"profile {path}: {exc}") from None


def load_profile(name: str, extra: Path | None = None) -> Profile:
    profiles = available(extra)
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; available: {', '.join(sorted(profiles)) or 'none'} "
                           f"(searched {', '.join(str(d) for d in search_path(extra))})")
    return parse_profile(profiles[name])
