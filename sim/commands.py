"""`fleetflow demo` and `fleetflow profiles list|show|validate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

profiles_app = typer.Typer(help="Device classes (firmware profiles).", no_args_is_help=True)


def demo(devices: int = typer.Option(100, "--devices", min=1, max=2000, help="Simulated devices"),
         broker: Optional[str] = typer.Option(None, "--broker", help="Use this broker instead of an embedded amqtt"),
         keep_running: bool = typer.Option(False, "--keep-running", help="Leave the hub up for the CLI afterwards"),
         seed: int = typer.Option(7, "--seed", help="Seed for the simulated fleet and its faults")) -> None:
    """Embedded broker, a hub, simulated devices, sample workflows and faults; prints the checker's verdict."""
    from .demo import run_demo

    if broker is not None:
        from agent.config import ConfigError, _broker

        try:
            _broker(broker, "--broker")
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
    raise typer.Exit(run_demo(devices, broker, keep_running, seed))


@profiles_app.command("list")
def profiles_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every known device class."""
    from .profiles import load_all

    profiles = load_all()
    if as_json:
        typer.echo(json.dumps([p.model_dump() for p in profiles.values()]))
        return
    for p in profiles.values():
        typer.echo(f"{p.name:10s} {p.resources.cores:g} cores, {p.resources.memory_mb:g} MB, "
                   f"{p.max_concurrent} slots - {p.description}")


@profiles_app.command("show")
def profiles_show(name: str) -> None:
    """One device class in full."""
    from .profiles import load_all

    profiles = load_all()
    if name not in profiles:
        typer.echo(f"error: unknown profile {name!r}; known: {', '.join(profiles)}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(profiles[name].model_dump(), indent=2))


@profiles_app.command("validate")
def profiles_validate(files: list[Path] = typer.Argument(None, help="Profile files (default: every known one)")
                      ) -> None:
    """Check profile files against the schema."""
    from agent.profiles import available

    from .profiles import ProfileFileError, parse

    paths = files or list(available().values())
    failed = False
    for path in paths:
        try:
            profile = parse(path)
            typer.echo(f"{path}: ok ({profile.name})")
        except ProfileFileError as exc:
            typer.echo(f"error: {exc}", err=True)
            failed = True
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.add_typer(profiles_app, name="profiles")
