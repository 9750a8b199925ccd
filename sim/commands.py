"""`fleetflow demo` and `fleetflow profiles list|show|validate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from hub.client import TokenFileOpt, TokenOpt

profiles_app = typer.Typer(help="Device classes (firmware profiles).", no_args_is_help=True)


def demo(devices: int = typer.Option(100, "--devices", min=1, max=2000, help="Simulated devices"),
         broker: Optional[str] = typer.Option(None, "--broker", help="Use this broker instead of an embedded amqtt"),
         keep_running: bool = typer.Option(False, "--keep-running", help="Leave the hub up for the CLI afterwards"),
         seed: int = typer.Option(7, "--seed", help="Seed for the simulated fleet and its faults"),
         restart_broker: bool = typer.Option(False, "--restart-broker",
                                             help="Also restart the embedded broker mid-run (amqtt 0.12 can stall)")
         ) -> None:
    """Embedded broker, a hub, simulated devices, sample workflows and faults; prints the checker's verdict."""
    from .demo import run_demo

    if broker is not None:
        from agent.config import ConfigError, _broker

        try:
            _broker(broker, "--broker")
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
    raise typer.Exit(run_demo(devices, broker, keep_running, seed, restart_broker))


def sim(broker: str = typer.Option(..., help="mqtt://HOST:PORT of the fleet's broker"),
        fleet: str = typer.Option(..., help="Fleet id (must be the hub's)"),
        devices: int = typer.Option(50, "--devices", min=1, max=20000, help="Simulated devices"),
        mix: str = typer.Option("rpi4=35,gateway=25,ipc=15,jetson=10,container=15", help="profile=weight,..."),
        procs: int = typer.Option(2, "--procs", min=1, max=64, help="Simulator processes"),
        duration: float = typer.Option(60.0, "--duration", min=1, help="Seconds to run after every device is up"),
        faults: Optional[Path] = typer.Option(None, "--faults", help="Fault file (YAML), e.g. sim/faults/mixed.yaml"),
        report: Optional[Path] = typer.Option(None, "--report", help="Write a JSON report here"),
        keepalive: int = typer.Option(10, "--keepalive", min=1, help="MQTT keepalive of each device, s"),
        seed: int = typer.Option(7, "--seed"),
        hub: Optional[str] = typer.Option(None, "--hub", help="Hub API URL [FLEETFLOW_HUB]"),
        token: Optional[str] = TokenOpt,
        token_file: Optional[Path] = TokenFileOpt,
        data: Optional[Path] = typer.Option(None, "--data", help="Data directory of a local hub")) -> None:
    """Simulated devices running the real agent against a hub, with faults; ends with the checker (exit 1 on FAIL)."""
    import asyncio

    from rich.console import Console

    from agent.config import ConfigError, _broker, _id
    from hub.client import Client
    from hub.workflow import WorkflowError

    from .faults import load_faults
    from .orchestra import parse_mix
    from .profiles import load_all
    from .run import Simulation

    try:
        _broker(broker, "--broker")
        _id(fleet, "--fleet")
        weights = parse_mix(mix)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    unknown = set(weights) - set(load_all())
    if unknown:
        typer.echo(f"error: --mix names unknown profile(s) {', '.join(sorted(unknown))}", err=True)
        raise typer.Exit(2)
    try:
        plan = load_faults(faults) if faults else None
    except (WorkflowError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    api = Client(hub, token_file, data)
    simulation = Simulation(api, broker, fleet, devices, weights, procs, duration, plan, keepalive, seed, Console())
    raise typer.Exit(asyncio.run(simulation.run(report)))


def _schema() -> Any:
    """sim/profiles.py, the full schema (pydantic), comes with the hub extra. Without it, as on a device, the profile
    commands read the files as the agent does (agent/profiles.py): the same files, fewer checks."""
    try:
        from . import profiles
    except ModuleNotFoundError as exc:
        from agent.extras import missing_extra

        if missing_extra(exc) is None:
            raise
        return None
    return profiles


def _as_agent_reads(path: Path) -> dict[str, Any]:
    from agent.profiles import parse_profile

    p = parse_profile(path)
    return {"name": p.name, "description": p.description, "capabilities": list(p.capabilities),
            "max_concurrent": p.max_concurrent, "labels": p.labels, "resources": p.resources(),
            "intervals": {"heartbeat_s": p.heartbeat_s, "telemetry_s": p.telemetry_s}, "thresholds": p.thresholds,
            "sim": p.sim}


def _all_profiles() -> dict[str, dict[str, Any]]:
    schema = _schema()
    if schema is not None:
        return {name: p.model_dump() for name, p in schema.load_all().items()}
    from agent.profiles import available

    return {name: _as_agent_reads(path) for name, path in sorted(available().items())}


@profiles_app.command("list")
def profiles_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every known device class."""
    profiles = _all_profiles()
    if as_json:
        typer.echo(json.dumps(list(profiles.values())))
        return
    for p in profiles.values():
        typer.echo(f"{p['name']:10s} {p['resources']['cores']:g} cores, {p['resources']['memory_mb']:g} MB, "
                   f"{p['max_concurrent']} slots - {p['description']}")


@profiles_app.command("show")
def profiles_show(name: str) -> None:
    """One device class in full."""
    profiles = _all_profiles()
    if name not in profiles:
        typer.echo(f"error: unknown profile {name!r}; known: {', '.join(profiles)}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(profiles[name], indent=2))


@profiles_app.command("validate")
def profiles_validate(files: list[Path] = typer.Argument(None, help="Profile files (default: every known one)")
                      ) -> None:
    """Check profile files against the schema."""
    from agent.profiles import ProfileError, available

    schema = _schema()
    if schema is None:
        typer.echo("note: checking as the agent reads profiles; the full schema check needs the hub extra: "
                   "pip install 'fleetflow[hub]'", err=True)
    paths = files or list(available().values())
    failed = False
    for path in paths:
        try:
            name = schema.parse(path).name if schema is not None else _as_agent_reads(path)["name"]
            typer.echo(f"{path}: ok ({name})")
        except (ValueError, ProfileError) as exc:  # the schema's ProfileFileError is a ValueError
            typer.echo(f"error: {exc}", err=True)
            failed = True
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("sim")(sim)
    app.add_typer(profiles_app, name="profiles")
