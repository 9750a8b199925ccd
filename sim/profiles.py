"""Firmware profiles validated in full (the agent reads the same TOML files with the standard library only).

`fleetflow profiles list|show|validate` use this schema; the simulator takes its device behaviour from `[sim]`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.profiles import available
from hub.health import Threshold


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Model):
    cores: float = Field(gt=0)
    memory_mb: float = Field(gt=0)
    disk_gb: float = Field(gt=0)


class Intervals(_Model):
    heartbeat_s: float = Field(gt=0)
    telemetry_s: float = Field(gt=0)


class SimBehaviour(_Model):
    baseline_cpu: float = Field(20.0, ge=0, le=100, description="idle CPU %")
    noise: float = Field(5.0, ge=0, description="CPU noise amplitude, %")
    step_speed: float = Field(1.0, gt=0, description="multiplier on simulated step durations (slower > 1)")
    failure_rate: float = Field(0.0, ge=0, le=1, description="chance a simulated step fails")
    boot_time_s: float = Field(1.0, ge=0, description="seconds from power-on to connecting")
    ambient_c: float = Field(30.0, description="temperature with no load")
    heat_per_cpu: float = Field(0.4, ge=0, description="degrees C above ambient per CPU %")
    cooling: float = Field(0.1, gt=0, le=1, description="fraction of the gap to equilibrium closed per sample")


class DeviceProfile(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str = ""
    capabilities: list[str] = Field(default_factory=list)
    max_concurrent: int = Field(1, ge=1, le=1024)
    labels: dict[str, str] = Field(default_factory=dict)
    resources: Resources
    intervals: Intervals
    thresholds: dict[str, Threshold] = Field(default_factory=dict)
    sim: SimBehaviour = Field(default_factory=SimBehaviour)


class ProfileFileError(ValueError):
    pass


def parse(path: Path) -> DeviceProfile:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ProfileFileError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        profile = DeviceProfile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'profile'}: {e['msg']}" for e in exc.errors())
        raise ProfileFileError(f"{path}: {problems}") from None
    if profile.name != Path(path).stem:
        raise ProfileFileError(f"{path}: name {profile.name!r} must match the file name {Path(path).stem!r}")
    return profile


def load_all(extra: Path | None = None) -> dict[str, DeviceProfile]:
    return {name: parse(path) for name, path in sorted(available(extra).items())}


SIM_EXECUTORS = ("sensor", "update")  # hardware steps the simulator provides (sim/worker.py)


def inventory(profiles: dict[str, DeviceProfile]) -> list[dict[str, object]]:
    """One simulated device per profile, in `fleetflow validate --fleet` inventory form."""
    builtins = ["noop", "sleep", "echo", "fail"]
    return [{"id": f"sim-{p.name}", "profile": p.name, "labels": dict(p.labels),
             "caps": sorted({*p.capabilities, *builtins, *SIM_EXECUTORS}), "resources": p.resources.model_dump()}
            for p in profiles.values()]
