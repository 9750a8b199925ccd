"""`fleetflow nodes list|show|accept|reject|revoke|drain|add`: the fleet and its enrollment, through the hub's API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .client import Client, DataOpt, HubOpt, JsonOpt, TokenFileOpt, TokenOpt, _table, fail

nodes_app = typer.Typer(help="List nodes and manage their enrollment.", no_args_is_help=True)


@nodes_app.command("list")
def nodes_list(as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
               token_file: Optional[Path] = TokenFileOpt,
               data: Optional[Path] = DataOpt) -> None:
    """List nodes with liveness, health, enrollment and labels."""
    nodes = Client(hub, token_file, data).call("GET", "/nodes")
    if as_json:
        typer.echo(json.dumps(nodes))
    else:
        _table("nodes", ["id", "liveness", "health", "enrollment", "kid", "profile", "running", "labels"],
               [[n["id"], n["liveness"], n["health"], n["enrollment"], n.get("kid"), n.get("profile"),
                 len(n.get("running", [])), ",".join(f"{k}={v}" for k, v in n["labels"].items())] for n in nodes])


@nodes_app.command("show")
def nodes_show(node_id: str, as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
               token_file: Optional[Path] = TokenFileOpt,
               data: Optional[Path] = DataOpt) -> None:
    """Show one node."""
    node = Client(hub, token_file, data).call("GET", f"/nodes/{node_id}")
    typer.echo(json.dumps(node, indent=None if as_json else 2))


def _node_action(action: str, node_id: str, hub: Optional[str], token_file: Optional[Path], data: Optional[Path],
                 as_json: bool, body: Optional[dict[str, Any]] = None) -> None:
    result = Client(hub, token_file, data).call("POST", f"/nodes/{node_id}/{action}", json=body)
    typer.echo(json.dumps(result) if as_json else f"{node_id}: {result.get('state', action)}")


@nodes_app.command("accept")
def nodes_accept(node_id: str,
                 kid: str = typer.Option(..., "--kid", help="The kid of the key you reviewed (nodes show ID; on the "
                                                           "device: fleetflow agent identity)"),
                 as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                 token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Accept a node's pending enrollment: the key it asks with must still be the one whose kid you give."""
    _node_action("accept", node_id, hub, token_file, data, as_json, {"kid": kid})


@nodes_app.command("reject")
def nodes_reject(node_id: str, as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                 token_file: Optional[Path] = TokenFileOpt,
                 data: Optional[Path] = DataOpt) -> None:
    """Reject a node's enrollment."""
    _node_action("reject", node_id, hub, token_file, data, as_json)


@nodes_app.command("revoke")
def nodes_revoke(node_id: str, as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                 token_file: Optional[Path] = TokenFileOpt,
                 data: Optional[Path] = DataOpt) -> None:
    """Revoke a node: its messages are refused from now on, its attempts move elsewhere."""
    _node_action("revoke", node_id, hub, token_file, data, as_json)


@nodes_app.command("drain")
def nodes_drain(node_id: str, off: bool = typer.Option(False, "--off", help="Take work again"),
                as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                token_file: Optional[Path] = TokenFileOpt,
                data: Optional[Path] = DataOpt) -> None:
    """Stop placing work on a node (running steps finish)."""
    _node_action("drain", node_id, hub, token_file, data, as_json, {"on": not off})


@nodes_app.command("add")
def nodes_add(node_id: str, public_key: str = typer.Argument(..., help="64 hex characters or a .pub file"),
              as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
              token_file: Optional[Path] = TokenFileOpt,
              data: Optional[Path] = DataOpt) -> None:
    """Pre-register a node's key: it is accepted when it first connects."""
    from agent.keys import KeyFileError, parse_public_key

    try:
        key = parse_public_key(public_key)
    except KeyFileError as exc:
        fail(str(exc), 2)
    result = Client(hub, token_file, data).call("POST", "/nodes", json={"id": node_id, "public_key": key.hex()})
    typer.echo(json.dumps(result) if as_json else f"{node_id}: {result['state']}")
