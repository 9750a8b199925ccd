"""Firmware profiles checked in full, for `fleetflow profiles list|show|validate` and the simulator (which takes its
device behaviour from `[sim]`).

The schema itself is declared once, in agent/runtime/profiles.py, with the standard library; the pydantic models
here are built from that declaration, adding what the agent does not check: bounds, unknown keys, threshold order
and the name matching the file. A profile that passes is then read exactly as the agent reads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from agent.runtime.profiles import Profile, ProfileError, Threshold, available, profile_from_document, read_document
from hub.health import Threshold as CheckedThreshold
from protocols import FleetflowError

DeviceProfile = Profile  # what the simulator calls a profile that passed the full check

_CONFIG = ConfigDict(extra="forbid", frozen=True)


def _annotation(kind: Any) -> Any:
    """The pydantic type that checks a declared type: lists as TOML has them, nested tables as models, and
    thresholds as the hub's policy checks them (critical not below high)."""
    origin, args = get_origin(kind), get_args(kind)
    if dataclasses.is_dataclass(kind):
        return model_of(kind)  # type: ignore[arg-type]
    if kind is Threshold:
        return CheckedThreshold
    if origin is tuple:
        return list[_annotation(args[0])]  # type: ignore[misc]
    if origin is dict:
        return dict[args[0], _annotation(args[1])]  # type: ignore[misc, valid-type]
    return kind


def _field(declared: dataclasses.Field[Any]) -> Any:
    meta = declared.metadata
    if declared.default_factory is not dataclasses.MISSING:
        return Field(default_factory=declared.default_factory, description=meta["doc"], **meta["bounds"])
    if declared.default is not dataclasses.MISSING:
        # validated: a declared tuple default becomes the list the file would give, and must be within bounds
        return Field(declared.default, description=meta["doc"], validate_default=True, **meta["bounds"])
    return Field(description=meta["doc"], **meta["bounds"])


def model_of(cls: type[Any]) -> type[BaseModel]:
    """A pydantic model of a declared dataclass, its `section` fields grouped into nested tables as in the file."""
    hints = get_type_hints(cls)
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for declared in dataclasses.fields(cls):
        definition = (_annotation(hints[declared.name]), _field(declared))
        section = declared.metadata["section"]
        if section is None:
            top[declared.name] = definition
            continue
        if section not in sections:
            sections[section] = {}
            top[section] = None  # keeps the file's order; filled in below
        sections[section][declared.name] = definition
    for section, members in sections.items():
        table = create_model(section.capitalize(), __config__=_CONFIG, **members)
        required = any(d[1].is_required() for d in members.values())
        top[section] = (table, Field() if required else Field(default_factory=table))
    return create_model(cls.__name__, __config__=_CONFIG, **top)


PROFILE_MODEL = model_of(Profile)


class ProfileFileError(FleetflowError, ValueError):
    """A profile file that does not pass the full check; a ValueError too, as callers catch it."""


def parse(path: Path) -> Profile:
    try:
        raw = read_document(path)
    except ProfileError as exc:
        raise ProfileFileError(str(exc)) from None
    try:
        PROFILE_MODEL.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'profile'}: {e['msg']}" for e in exc.errors())
        raise ProfileFileError(f"{path}: {problems}") from None
    name = raw["name"]  # a valid id now
    if name != Path(path).stem:
        raise ProfileFileError(f"{path}: name {name!r} must match the file name {Path(path).stem!r}")
    try:
        return profile_from_document(raw, path)
    except ProfileError as exc:  # cannot happen for a document that passed the check above, but say so if it does
        raise ProfileFileError(str(exc)) from None


def load_all(extra: Path | None = None) -> dict[str, Profile]:
    return {name: parse(path) for name, path in sorted(available(extra).items())}


SIM_EXECUTORS = ("sensor", "update")  # hardware steps the simulator provides (sim/worker.py)


def inventory(profiles: dict[str, Profile]) -> list[dict[str, object]]:
    """One simulated device per profile, in `fleetflow validate --fleet` inventory form."""
    builtins = ["noop", "sleep", "echo", "fail"]
    return [{"id": f"sim-{p.name}", "profile": p.name, "labels": dict(p.labels),
             "caps": sorted({*p.capabilities, *builtins, *SIM_EXECUTORS}), "resources": p.resources()}
            for p in profiles.values()]
