"""`fleetflow demo`, `fleetflow sim` and `fleetflow profiles list|show|validate`."""

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
         restart_broker: bool = typer.Option(True, "--restart-broker/--no-broker-restart",
                                             help="Restart the embedded broker mid-run, while devices run steps")
         ) -> None:
    """Embedded broker, a hub, simulated devices, sample workflows and faults; prints the checker's verdict."""
    from .demo import run_demo

    if broker is not None:
        from agent.runtime.settings import ConfigError, as_broker_url

        try:
            as_broker_url(broker, "--broker")
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
        rate: float = typer.Option(1.0, "--rate", min=0, help="Workload: runs submitted per device per minute "
                                                              "while --duration lasts"),
        hub: Optional[str] = typer.Option(None, "--hub", help="Hub API URL [FLEETFLOW_HUB]"),
        token: Optional[str] = TokenOpt,
        token_file: Optional[Path] = TokenFileOpt,
        data: Optional[Path] = typer.Option(None, "--data", help="Data directory of a local hub"),
        journal: Optional[Path] = typer.Option(None, "--journal", help="The hub's journal file (journal.sqlite), "
                                                                       "when its data directory is not --data")
        ) -> None:
    """Simulated devices running the real agent against a hub, with faults and a workload proportional to the fleet;
    ends with the history checker, which reads the wire, the hub's journal file and the devices' outboxes (exit 1 on
    FAIL)."""
    import asyncio

    from rich.console import Console

    from agent.runtime.settings import ConfigError, as_broker_url, as_id
    from hub.client import Client
    from hub.workflow import WorkflowError

    from .fault_file import load_faults
    from .orchestra import parse_mix
    from .profiles import load_all
    from .run import SimOptions, simulate

    try:
        as_broker_url(broker, "--broker")
        as_id(fleet, "--fleet")
        weights = parse_mix(mix)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    unknown = set(weights) - set(load_all())
    if unknown:
        typer.echo(f"error: --mix names unknown profile(s) {', '.join(sorted(unknown))}", err=True)
        raise typer.Exit(2)
    try:
        timeline = load_faults(faults) if faults else ()
    except (WorkflowError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    from hub.journal_commands import JOURNAL_FILE

    journal = journal or (data / JOURNAL_FILE if data is not None else None)
    if journal is None:
        typer.echo("error: the checker reads the hub's journal file: give the hub's data directory with --data, or "
                   "--journal FILE", err=True)
        raise typer.Exit(2)
    options = SimOptions(broker, fleet, devices, weights, procs, duration, keepalive, seed, timeline, rate, journal)
    raise typer.Exit(asyncio.run(simulate(Client(hub, token_file, data), options, report, Console())))


def _schema() -> Any:
    """sim/profiles.py, the full schema (pydantic), comes with the hub extra. Without it, as on a device, the profile
    commands read the files as the agent does (agent/runtime/profiles.py): the same files, fewer checks."""
    try:
        from . import profiles
    except ModuleNotFoundError as exc:
        from agent.extras import missing_extra

        if missing_extra(exc) is None:
            raise
        return None
    return profiles


def _all_profiles() -> dict[str, dict[str, Any]]:
    from agent.runtime.profiles import as_document, available, parse_profile

    schema = _schema()
    if schema is not None:
        return {name: as_document(p) for name, p in schema.load_all().items()}
    return {name: as_document(parse_profile(path)) for name, path in sorted(available().items())}


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
    from agent.runtime.profiles import ProfileError, available, parse_profile

    schema = _schema()
    if schema is None:
        typer.echo("note: checking as the agent reads profiles; the full schema check needs the hub extra: "
                   "pip install 'fleetflow[hub]'", err=True)
    paths = files or list(available().values())
    failed = False
    for path in paths:
        try:
            name = (schema.parse if schema is not None else parse_profile)(path).name
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
