"""How every `fleetflow` command ends on an error: one line on stderr, and the exit code scripts read (1: the answer
is "no", 2: usage). The agent's, hub's and simulator's commands all end this way."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
