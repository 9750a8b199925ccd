"""Commands from packages whose dependencies are extras (hub, sim), loaded only when they are named.

A device installs the agent's dependencies alone (the wheel, or `pip install .`, with no extras). Its commands must
all work there, so nothing the agent runs may import the hub's libraries (PyYAML, pydantic, FastAPI, ...); and the other
commands stay listed in `--help`, and say which extra to install (exit 2) instead of failing with an import error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

# Command name -> (the package whose `commands.register(app)` adds it, the extras it needs). Names are listed here so
# help shows them where the package cannot be imported; tests/unit/test_extras.py checks this against `register`.
OPTIONAL_COMMANDS: dict[str, tuple[str, str]] = {
    "hub": ("hub", "hub"), "run": ("hub", "hub"), "nodes": ("hub", "hub"), "schema": ("hub", "hub"),
    "validate": ("hub", "hub"), "token": ("hub", "hub"), "audit": ("hub", "hub"), "journal": ("hub", "hub"), "broker": ("hub", "hub"),
    "artifacts": ("hub", "hub"), "deploy": ("hub", "hub"), "deployments": ("hub", "hub"),
    "demo": ("sim", "hub,broker"), "sim": ("sim", "hub"), "profiles": ("sim", "hub"),
}


def _hub_commands(app: typer.Typer) -> None:
    from hub.commands import register

    register(app)


def _sim_commands(app: typer.Typer) -> None:
    from sim.commands import register

    register(app)


# The one place the agent package names the hub and the simulator: the `fleetflow` command is composed here, and each
# package's commands are imported only when one of them is used.
REGISTRARS: dict[str, Callable[[typer.Typer], None]] = {"hub": _hub_commands, "sim": _sim_commands}
PACKAGES = tuple(REGISTRARS)
# Top-level modules that only an extra brings (pydantic too: some typer releases depend on it, others do not).
EXTRA_OF_MODULE = {"yaml": "hub", "pydantic": "hub", "pydantic_core": "hub", "fastapi": "hub", "starlette": "hub",
                   "uvicorn": "hub", "prometheus_client": "hub", "apscheduler": "hub", "httpx": "hub",
                   "httpcore": "hub", "amqtt": "broker"}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The extra that provides the module an import could not find; None when it is not an extra's (a bug)."""
    return EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])


def needs_extra_message(name: str, extra: str) -> str:
    extras = extra.split(",")
    return (f"the {name} commands need the {' and '.join(extras)} extra{'s' if len(extras) > 1 else ''}: "
            f"pip install 'fleetflow[{extra}]'")


def _needs_extra(name: str, extra: str) -> Any:
    """A stand-in for a command whose package cannot be imported: listed in help, and any use of it (even --help)
    prints which extra to install and exits 2."""
    message = needs_extra_message(name, extra)
    stub = typer.Typer(add_completion=False)

    # Help is rich markup, where [hub] would vanish: it names the extra without the install line.
    @stub.command(name, help=f"(not installed: needs the {extra.replace(',', ' and ')} extra)", add_help_option=False,
                  context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def missing() -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    command = typer.main.get_command(stub)
    command.name = name
    return command


class RootGroup(TyperGroup):
    """The root command: its own commands as usual, the hub's and simulator's imported on first use."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._packages: dict[str, bool] = {}

    def _load(self, package: str) -> bool:
        """Import `package.commands` and add its commands; False when an extra it needs is not installed."""
        if package not in self._packages:
            try:
                holder = typer.Typer()
                REGISTRARS[package](holder)
                commands = typer.main.get_group(holder).commands
            except ModuleNotFoundError as exc:
                if missing_extra(exc) is None:
                    raise
                self._packages[package] = False
                return False
            for name, command in commands.items():
                self.commands.setdefault(name, command)
            self._packages[package] = True
        return self._packages[package]

    def list_commands(self, ctx: Any) -> list[str]:
        for package in PACKAGES:  # help and completion only: importing the hub costs time nothing else pays
            self._load(package)
        names = super().list_commands(ctx)
        return names + [name for name in OPTIONAL_COMMANDS if name not in names]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        if cmd_name in OPTIONAL_COMMANDS:
            package, extra = OPTIONAL_COMMANDS[cmd_name]
            if not self._load(package):
                return _needs_extra(cmd_name, extra)
        else:  # a command added since the table was written: look in every package
            for package in PACKAGES:
                self._load(package)
        return super().get_command(ctx, cmd_name)
