"""`fleetflow nodes list|show|accept|reject|revoke|drain|add|delete`: the fleet and its enrollment, through the hub's
API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from .client import (Client, DataOpt, Format, HubOpt, JsonOpt, OutputOpt, TokenFileOpt, TokenOpt, WatchOpt,
                     WatchTimeoutOpt, ago, emit, fail, now_ms, output_format, table, watch, when)

nodes_app = typer.Typer(help="List nodes and manage their enrollment.", no_args_is_help=True)
LabelOpt = typer.Option([], "--label", "-l", help="Only nodes with this label, KEY=VALUE; repeatable, all must match")


def _selector(pairs: list[str]) -> dict[str, str]:
    from .registry import parse_selector

    try:
        return parse_selector(pairs)
    except ValueError as exc:
        fail(f"-l: {exc}", 2)


@nodes_app.command("list")
def nodes_list(as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt, watch_: bool = WatchOpt,
               watch_timeout: Optional[float] = WatchTimeoutOpt, hub: Optional[str] = HubOpt,
               token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
               data: Optional[Path] = DataOpt, label: list[str] = LabelOpt) -> None:
    """List nodes with liveness, health, enrollment and labels."""
    fmt = output_format(output, as_json)
    _selector(label)  # a malformed selector is a usage error before the hub is asked
    client = Client(hub, token_file, data)

    def fetch() -> Any:
        return client.call("GET", "/nodes", params={"label": label})  # the hub filters: every -l must match

    if watch_:
        # what changes at every heartbeat is not news: a watch prints when something else changes
        watch(fetch, fmt, _nodes_text, timeout=watch_timeout, volatile=VOLATILE)
    else:
        emit(fetch(), fmt, _nodes_text)


VOLATILE = frozenset({"last_seen", "telemetry", "heartbeat"})


def _nodes_text(nodes: list[dict[str, Any]], wide: bool) -> str:
    now = now_ms()
    columns = ["id", "liveness", "health", "enrollment", "kid", "profile", "running", "last seen", "labels"]
    if wide:
        columns += ["slots", "draining", "throttled", "breaker", "since", "caps", "versions"]
    rows = []
    for n in nodes:
        row = [n["id"], n["liveness"], n["health"], n["enrollment"], n.get("kid"), n.get("profile"),
               len(n.get("running", [])), ago(n.get("last_seen"), now), _pairs(n["labels"])]
        if wide:
            row += [n.get("slots"), _yes(n.get("draining")), _yes(n.get("throttled")), n.get("breaker"),
                    ago(n.get("changed_at"), now), ",".join(n.get("caps", [])), _versions(n.get("versions"))]
        rows.append(row)
    return table(columns, rows)


@nodes_app.command("show")
def nodes_show(node_id: str, as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt,
               hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
               token_file: Optional[Path] = TokenFileOpt,
               data: Optional[Path] = DataOpt) -> None:
    """Show one node: liveness, health and why, enrollment and key, capabilities, work, telemetry, history."""
    node = Client(hub, token_file, data).call("GET", f"/nodes/{node_id}")
    emit(node, output_format(output, as_json), _node_text)


HISTORY_SHOWN = 10  # history entries in the text view; -o wide shows all the hub keeps


def _node_text(node: dict[str, Any], wide: bool) -> str:
    now = now_ms()
    fields: list[tuple[str, Any]] = [
        ("liveness", f"{node['liveness']}" + (f" since {when(node['changed_at'], now)}" if node.get("changed_at")
                                               else "")),
        ("health", node["health"] + ("; throttled" if node.get("throttled") else "")
         + (f"; circuit breaker {node['breaker']}" if node.get("breaker", "closed") != "closed" else "")),
        ("draining", _yes(node.get("draining")) if "draining" in node else None),
        ("last seen", when(node["last_seen"], now) if node.get("last_seen") else None),
        ("conflict", f"{node['conflict']['reason']} (boots {node['conflict']['boots']}, since "
                     f"{when(node['conflict']['since'], now)})" if node.get("conflict") else None),
        ("enrollment", node["enrollment"]),
        ("kid", node.get("kid")),
        ("public key", node.get("key")),
        ("profile", node.get("profile")),
        ("boot", node.get("boot")),
        ("labels", _pairs(node["labels"])),
        ("capabilities", ", ".join(node["caps"]) if node.get("caps") else None),
        ("resources", ", ".join(f"{k} {v:g}" for k, v in sorted(node["resources"].items()))
         if node.get("resources") else None),
        ("slots", node.get("slots")),
        ("versions", _versions(node.get("versions")) or None),
        ("running", ", ".join(node["running"]) if node.get("running") else ("none" if "running" in node else None)),
    ]
    beat = node.get("heartbeat")
    if beat is not None:
        fields.append(("heartbeat", f"running {beat['running']}, free {beat['free']}, outbox {beat['outbox']}, "
                                    f"shed {beat['shed']}" + (f", rejected {beat['rejected']}" if beat["rejected"]
                                                              else "")))
    if node.get("telemetry"):
        fields.append(("telemetry", ", ".join(f"{k} {v:g}" for k, v in sorted(node["telemetry"].items()))))
    width = max(len(name) for name, _ in fields)
    lines = [f"node {node['id']}"] + [f"  {name + ':':{width + 1}} {value}" for name, value in fields
                                       if value not in (None, "")]
    history = node.get("history") or []
    shown = history if wide else history[-HISTORY_SHOWN:]
    if shown:
        lines += ["", "history" + (f" (last {len(shown)} of {len(history)}; -o wide shows all)"
                                   if len(shown) < len(history) else "") + ":"]
        for entry in shown:
            what = " ".join(str(entry[k]) for k in ("kind", "state", "health", "action") if entry.get(k))
            lines.append(f"  {when(entry['at'], now)}  {what}" + (f": {entry['reason']}" if entry.get("reason")
                                                                   else ""))
    return "\n".join(lines)


def _versions(versions: Optional[dict[str, str]]) -> str:
    """What deployments left on the node (hub/deployments/): component@version, comma-separated."""
    return ",".join(f"{component}@{version}" for component, version in sorted((versions or {}).items()))


def _pairs(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _node_action(action: str, node_id: str, hub: Optional[str], token_file: Optional[Path], data: Optional[Path],
                 as_json: bool, body: Optional[dict[str, Any]] = None) -> None:
    result = Client(hub, token_file, data).call("POST", f"/nodes/{node_id}/{action}", json=body)
    typer.echo(json.dumps(result) if as_json else f"{node_id}: {result.get('state', action)}")


@nodes_app.command("accept")
def nodes_accept(node_id: Optional[str] = typer.Argument(None, help="The node to accept (or --all)"),
                 kid: Optional[str] = typer.Option(None, "--kid", help="The kid of the key you reviewed (nodes show "
                                                                      "ID; on the device: fleetflow agent identity)"),
                 all_pending: bool = typer.Option(False, "--all", help="Accept every pending node, each with the key "
                                                                       "it asks with now (never a rejected or revoked "
                                                                       "one)"),
                 as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                 token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Accept a node's pending enrollment: the key it asks with must still be the one whose kid you give."""
    if all_pending:
        if node_id is not None or kid is not None:
            fail("--all accepts every pending node by the kid it asks with: give no ID and no --kid with it", 2)
        accepted = Client(hub, token_file, data).call("POST", "/nodes/accept-all")
        if as_json:
            typer.echo(json.dumps(accepted))
        else:
            typer.echo("\n".join(f"{d['id']}: accepted (kid {d['kid']})" for d in accepted) or "no pending nodes")
        return
    if node_id is None or kid is None:
        fail("give the node ID and --kid KID (the kid you reviewed), or --all", 2)
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
    """Enroll a node's key: before it first connects, or to re-key a revoked node (its device has a new key)."""
    from agent.runtime.keys import KeyFileError, parse_public_key

    try:
        key = parse_public_key(public_key)
    except KeyFileError as exc:
        fail(str(exc), 2)
    result = Client(hub, token_file, data).call("POST", "/nodes", json={"id": node_id, "public_key": key.hex()})
    typer.echo(json.dumps(result) if as_json else f"{node_id}: {result['state']}")


@nodes_app.command("delete")
def nodes_delete(node_id: str,
                 force: bool = typer.Option(False, "--force", help="Also while it is online: its work moves and its "
                                                                   "messages are refused from then on"),
                 as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                 token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Forget a node: its enrollment, key and record. Refused while it is online or suspected, unless --force."""
    result = Client(hub, token_file, data).call("DELETE", f"/nodes/{node_id}", params={"force": force})
    typer.echo(json.dumps(result) if as_json else f"{node_id}: deleted")
