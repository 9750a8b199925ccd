"""`fleetflow token create|list|revoke`: named API tokens with roles, through the hub's API with an admin token.

Through the API rather than the data directory, so the hub checks the caller's role, audits who did it and from
where, and a token made or revoked is honoured from the next request on; `--data DIR` of a local hub finds the API
and the admin token (DATA/api.token) the way every client command does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import typer

from .client import (Client, DataOpt, Format, HubOpt, JsonOpt, OutputOpt, TokenFileOpt, TokenOpt, emit, now_ms,
                     output_format, table, when)
from .tokens import ROLES

token_app = typer.Typer(help="Make, list and revoke API tokens with roles (viewer, operator, admin).",
                        no_args_is_help=True)


def _role(value: str) -> str:
    if value not in ROLES:
        raise typer.BadParameter(f"one of {', '.join(ROLES)}")
    return value


@token_app.command("create")
def token_create(name: str = typer.Argument(..., help="A name for the token: 1 to 64 of A-Z a-z 0-9 _ . -"),
                 role: str = typer.Option(..., "--role", callback=_role,
                                          help="viewer (read), operator (also runs and drain) or admin (also nodes "
                                               "and tokens)"),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON: name, role, token, created_at, "
                                                                   "created_by"),
                 hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                 token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Make a token with a role (needs an admin token). It is printed once: the hub keeps only its hash."""
    made = Client(hub, token_file, data).call("POST", "/tokens", json={"name": name, "role": role})
    if as_json:
        typer.echo(json.dumps(made))
        return
    typer.echo(made["token"])  # alone on stdout, the note on stderr: a script captures just the token
    typer.echo(f"token {made['name']!r} ({made['role']}) made; it is shown this once: keep it in a file of mode 0600 "
               f"and give it with --token-file FILE or FLEETFLOW_TOKEN", err=True)


@token_app.command("list")
def token_list(as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt, hub: Optional[str] = HubOpt,
               token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
               data: Optional[Path] = DataOpt) -> None:
    """List the tokens and their roles (never the tokens; needs an admin token)."""
    emit(Client(hub, token_file, data).call("GET", "/tokens"), output_format(output, as_json), _tokens_text)


def _tokens_text(tokens: list[dict[str, Any]], wide: bool) -> str:
    now = now_ms()
    return table(["name", "role", "created", "by"],
                 [[t["name"], t["role"], when(t.get("created_at"), now) if t.get("created_at") else t.get("file"),
                   t.get("created_by") or "-"] for t in tokens])


@token_app.command("revoke")
def token_revoke(name: str, as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                 token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Revoke a token: the hub refuses it from the next request on (needs an admin token)."""
    revoked = Client(hub, token_file, data).call("DELETE", f"/tokens/{quote(name, safe='')}")
    typer.echo(json.dumps(revoked) if as_json else f"token {revoked['name']!r} ({revoked['role']}) revoked")
