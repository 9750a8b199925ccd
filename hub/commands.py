"""Hub commands: `fleetflow hub run|identity`, `run ...`, `nodes ...`, `schema workflow`, `validate`.

Client commands find the hub from `--hub URL` and `--token-file`, from FLEETFLOW_HUB and FLEETFLOW_TOKEN (or
FLEETFLOW_TOKEN_FILE), or from `--data DIR` of a local hub; a secret is never taken from the command line. Exit codes:
0 done; 1 refused or failed (a bad workflow, a run that failed); 2 usage error; 3 the hub cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from .limits import DEFAULT_LIMITS, MAX_DEPTH
from .registry import DEFAULT_MAX_PENDING, DEFAULT_TOKEN_USES

hub_app = typer.Typer(help="Run the hub and show its identity.", no_args_is_help=True)
run_app = typer.Typer(help="Submit and follow workflow runs.", no_args_is_help=True)
nodes_app = typer.Typer(help="List nodes and manage their enrollment.", no_args_is_help=True)
schema_app = typer.Typer(help="Print JSON Schemas.", no_args_is_help=True)

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


def fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def refuse_secret_flag(flag: str, instead: str) -> Any:
    """A typer callback for a flag that used to take a secret: a command line is visible to every user (ps), so
    the flag is kept only to say where the secret goes now (exit 2)."""

    def check(value: Optional[str]) -> Optional[str]:
        if value is not None:
            fail(f"{flag} is not accepted on the command line (other users see it in ps); use {instead}", 2)
        return value

    return check


# -- hub run / identity ----------------------------------------------------------------------------------------

def _split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        fail(f"{what} {value!r}: expected HOST:PORT", 2)
    return host.strip("[]"), int(port)


@hub_app.command("run")
def hub_run(broker: str = typer.Option(..., help="mqtt://HOST:PORT (with --embedded-broker: where to listen)"),
            fleet: str = typer.Option(..., help="Fleet id"),
            data: Path = typer.Option(..., help="Data directory: key, journal, registry, API token"),
            api: str = typer.Option("127.0.0.1:8470", help="HOST:PORT of the HTTP API (port 0: any free port)"),
            auto_accept: bool = typer.Option(False, "--auto-accept", help="Accept every enroll request (labs)"),
            embedded_broker: bool = typer.Option(False, "--embedded-broker", help="Start an amqtt broker in-process"),
            enroll_token: Optional[str] = typer.Option(
                None, "--enroll-token", hidden=True,
                callback=refuse_secret_flag("--enroll-token", "FLEETFLOW_ENROLL_TOKEN or --enroll-token-file FILE")),
            enroll_token_file: Optional[Path] = typer.Option(
                None, "--enroll-token-file", help="File (mode 0600) holding a token that admits nodes proving they "
                                                  "hold it [FLEETFLOW_ENROLL_TOKEN, FLEETFLOW_ENROLL_TOKEN_FILE]"),
            enroll_token_uses: int = typer.Option(
                DEFAULT_TOKEN_USES, "--enroll-token-uses", min=1,
                help="Enrollments the enroll token may admit, counted across restarts (a node asking again with "
                     "its enrolled key uses none)"),
            max_pending: int = typer.Option(DEFAULT_MAX_PENDING, "--max-pending", min=1,
                                            help="Pending enroll requests kept; beyond, the oldest is dropped"),
            username: Optional[str] = typer.Option(None, help="Broker username (password: FLEETFLOW_PASSWORD)"),
            ca_file: Optional[str] = typer.Option(None, "--ca-file", help="CA for mqtts://"),
            policy: Optional[Path] = typer.Option(None, "--policy", help="Adaptation policy YAML (health, rules)"),
            max_request_bytes: int = typer.Option(DEFAULT_LIMITS.request_bytes, "--max-request-bytes", min=1,
                                                  help="Largest HTTP request body (413 beyond)"),
            max_workflow_bytes: int = typer.Option(DEFAULT_LIMITS.workflow_bytes, "--max-workflow-bytes", min=1,
                                                   help="Largest workflow YAML text (422 beyond, as the limits below)"),
            max_workflow_steps: int = typer.Option(DEFAULT_LIMITS.steps, "--max-workflow-steps", min=1,
                                                   help="Most steps in one workflow"),
            max_workflow_depth: int = typer.Option(DEFAULT_LIMITS.depth, "--max-workflow-depth", min=1, max=MAX_DEPTH,
                                                   help="Deepest nesting in a workflow or its inputs"),
            max_workflow_aliases: int = typer.Option(DEFAULT_LIMITS.aliases, "--max-workflow-aliases", min=0,
                                                     help="Most YAML aliases (*name) in one workflow"),
            max_workflow_nodes: int = typer.Option(DEFAULT_LIMITS.nodes, "--max-workflow-nodes", min=1,
                                                   help="Most values in a workflow or its inputs, YAML aliases "
                                                        "expanded"),
            log_level: str = typer.Option("info", "--log-level")) -> None:
    """Run the hub until SIGTERM or SIGINT."""
    from .health import Policy, load_policy
    from .workflow import WorkflowError
    from agent.config import ConfigError, _broker, _id

    from agent.keys import KeyFileError

    from .limits import Limits
    from .service import Hub, HubConfig, OperatorError

    try:
        _id(fleet, "--fleet")
        _broker(broker, "--broker")
    except ConfigError as exc:
        fail(str(exc), 2)
    host, port = _split_hostport(api, "--api")
    try:
        rules = load_policy(policy) if policy else Policy()
    except WorkflowError as exc:
        for where, what in exc.problems:
            typer.echo(f"{where}: {what}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = _enroll_token(enroll_token_file)
    config = HubConfig(broker, fleet, data, host, port, auto_accept, token, enroll_token_uses, max_pending, username,
                       os.environ.get("FLEETFLOW_PASSWORD"), ca_file, policy=rules,
                       limits=Limits(request_bytes=max_request_bytes, workflow_bytes=max_workflow_bytes,
                                     steps=max_workflow_steps, depth=max_workflow_depth,
                                     aliases=max_workflow_aliases, nodes=max_workflow_nodes))

    async def main() -> None:
        embedded = await start_embedded_broker(broker) if embedded_broker else None
        try:
            hub = Hub(config)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, hub.stop)
            await hub.run()
        finally:
            if embedded is not None:
                await embedded.shutdown()

    try:
        asyncio.run(main())
    except KeyFileError as exc:  # hub.key or api.token unreadable, malformed, or readable by others
        fail(str(exc), 2)
    except OperatorError as exc:  # a setting that cannot be used, named in the message (--api)
        fail(str(exc), 1)
    except OSError as exc:
        fail(f"cannot start: {exc}", 1)


MIN_ENROLL_TOKEN = 16


def _enroll_token(token_file: Optional[Path]) -> Optional[str]:
    """The hub's enroll token from --enroll-token-file, FLEETFLOW_ENROLL_TOKEN or FLEETFLOW_ENROLL_TOKEN_FILE."""
    from agent.config import ConfigError, read_secret_file

    try:
        if token_file is not None:
            token = read_secret_file(token_file, "--enroll-token-file")
        elif os.environ.get("FLEETFLOW_ENROLL_TOKEN"):
            token = os.environ["FLEETFLOW_ENROLL_TOKEN"]
        elif os.environ.get("FLEETFLOW_ENROLL_TOKEN_FILE"):
            token = read_secret_file(os.environ["FLEETFLOW_ENROLL_TOKEN_FILE"], "FLEETFLOW_ENROLL_TOKEN_FILE")
        else:
            return None
    except ConfigError as exc:
        fail(str(exc), 2)
    # A proof sniffed off the wire lets anyone try tokens offline, as fast as HMAC runs: only a long random token
    # keeps that hopeless.
    if len(token) < MIN_ENROLL_TOKEN:
        fail(f"the enroll token has {len(token)} characters; use at least {MIN_ENROLL_TOKEN} random ones "
             f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')", 2)
    return token


async def start_embedded_broker(url: str) -> Any:
    """An amqtt broker in this process, listening where the broker URL points."""
    from urllib.parse import urlsplit

    from amqtt.broker import Broker

    parts = urlsplit(url)
    config = {"listeners": {"default": {"type": "tcp", "bind": f"{parts.hostname}:{parts.port or 1883}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
    broker = Broker(config)
    await broker.start()
    return broker


@hub_app.command("identity")
def hub_identity(data: Path = typer.Option(..., help="The hub's data directory"),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the hub's public key (give it to agents as --hub-key), API URL and token file."""
    from agent.keys import KeyFileError, load_key

    try:
        key = load_key(data / "hub.key")
    except KeyFileError as exc:
        fail(f"{exc} (is {data} a hub data directory?)", 2)
    meta = _meta(data)
    info = {"public_key": bytes(key.verify_key).hex(), "api": meta.get("api"), "token_file": str(data / "api.token"),
            "fleet": meta.get("fleet")}
    typer.echo(json.dumps(info) if as_json else "\n".join(f"{k:11s} {v}" for k, v in info.items()))


def _meta(data: Path) -> dict[str, Any]:
    try:
        raw = json.loads((data / "hub.json").read_text())
    except (OSError, ValueError):
        return {}
    return dict(raw.get("_default", {}).get("1", {}))


# -- the client --------------------------------------------------------------------------------------------------

class Client:
    def __init__(self, hub: Optional[str], token_file: Optional[Path], data: Optional[Path]) -> None:
        import httpx

        url = hub or os.environ.get("FLEETFLOW_HUB")
        token = _api_token(token_file)
        if data is not None:
            meta = _meta(data)
            url = url or meta.get("api")
            if token is None:
                try:
                    token = (data / "api.token").read_text().strip()
                except OSError:
                    fail(f"no API token in {data} (is it a hub data directory?)", 2)
        if not url:
            fail("which hub? give --hub URL (or FLEETFLOW_HUB), or --data DIR of a local hub", 2)
        if not token:
            fail("no API token: give --token-file (or FLEETFLOW_TOKEN or FLEETFLOW_TOKEN_FILE), or --data DIR of a "
                 "local hub", 2)
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the hub at {self.url}: {exc}", 3)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if isinstance(detail, list):  # FastAPI validation errors
                detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
            fail(f"{detail} (HTTP {response.status_code})", 2 if response.status_code == 401 else 1)
        return response.json()


HubOpt = typer.Option(None, "--hub", help="Hub API URL [FLEETFLOW_HUB]")
def _api_token(token_file: Optional[Path]) -> Optional[str]:
    """The API token from --token-file, FLEETFLOW_TOKEN or FLEETFLOW_TOKEN_FILE, in that order; never from argv."""
    from agent.config import ConfigError, read_secret_file

    try:
        if token_file is not None:
            return read_secret_file(token_file, "--token-file")
        if os.environ.get("FLEETFLOW_TOKEN"):
            return os.environ["FLEETFLOW_TOKEN"]
        if os.environ.get("FLEETFLOW_TOKEN_FILE"):
            return read_secret_file(os.environ["FLEETFLOW_TOKEN_FILE"], "FLEETFLOW_TOKEN_FILE")
    except ConfigError as exc:
        fail(str(exc), 2)
    return None


TokenOpt = typer.Option(None, "--token", hidden=True,
                        callback=refuse_secret_flag("--token", "FLEETFLOW_TOKEN or --token-file FILE"))
TokenFileOpt = typer.Option(None, "--token-file", help="File (mode 0600) holding the API token [FLEETFLOW_TOKEN, "
                                                       "FLEETFLOW_TOKEN_FILE]")
DataOpt = typer.Option(None, "--data", help="Data directory of a local hub")
JsonOpt = typer.Option(False, "--json", help="Print JSON")


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[("" if v is None else str(v)) for v in row])
    Console().print(table)


def _parse_inputs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--input {pair!r}: expected NAME=VALUE", 2)
        try:
            out[key] = json.loads(value)  # numbers, booleans, lists, objects
        except ValueError:
            out[key] = value
    return out


# -- runs --------------------------------------------------------------------------------------------------------

@run_app.command("submit")
def run_submit(workflow: Path = typer.Argument(..., help="Workflow YAML file"),
               input_: list[str] = typer.Option([], "--input", help="NAME=VALUE (JSON values allowed), repeatable"),
               wait: bool = typer.Option(False, "--wait", help="Wait until the run ends; exit 1 unless it succeeded"),
               timeout: float = typer.Option(600.0, "--timeout", help="With --wait: give up after S seconds"),
               key: Optional[str] = typer.Option(None, "--key", help="Idempotency key"),
               as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
               token_file: Optional[Path] = TokenFileOpt,
               data: Optional[Path] = DataOpt) -> None:
    """Submit a workflow run."""
    from .workflow import WorkflowError, load_workflow

    try:
        load_workflow(workflow)  # errors with file and line, before anything is sent
    except WorkflowError as exc:
        for where, what in exc.problems:
            typer.echo(f"{where}: {what}", err=True)
        raise typer.Exit(1)
    inputs = _parse_inputs(input_)
    client = Client(hub, token_file, data)
    headers = {"Idempotency-Key": key} if key else {}
    created = client.call("POST", "/runs", json={"workflow": workflow.read_text(), "inputs": inputs}, headers=headers)
    run_id = created["id"]
    if not wait:
        typer.echo(json.dumps({"id": run_id}) if as_json else run_id)
        return
    deadline = time.monotonic() + timeout
    while True:
        run = client.call("GET", f"/runs/{run_id}")
        if run["state"] in TERMINAL:
            break
        if time.monotonic() > deadline:
            fail(f"run {run_id} still {run['state']} after {timeout:g} s", 1)
        time.sleep(0.2)
    typer.echo(json.dumps(run) if as_json else f"{run_id} {run['state']}" + (f": {run['error']}" if run["error"] else ""))
    if run["state"] != "succeeded":
        raise typer.Exit(1)


@run_app.command("list")
def run_list(state: Optional[str] = typer.Option(None, help="Only runs in this state"), as_json: bool = JsonOpt,
             hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
             token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """List runs, newest first."""
    runs = Client(hub, token_file, data).call("GET", "/runs", params={"state": state} if state else {})
    if as_json:
        typer.echo(json.dumps(runs))
    else:
        _table("runs", ["id", "workflow", "version", "state", "error"],
               [[r["id"], r["workflow"], r["version"], r["state"], r["error"]] for r in runs])


@run_app.command("show")
def run_show(run_id: str, as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
             token_file: Optional[Path] = TokenFileOpt,
             data: Optional[Path] = DataOpt) -> None:
    """Show a run, its steps and their attempts."""
    run = Client(hub, token_file, data).call("GET", f"/runs/{run_id}")
    if as_json:
        typer.echo(json.dumps(run))
        return
    typer.echo(f"run {run['id']} ({run['workflow']} {run['version']}): {run['state']}"
               + (f" - {run['error']}" if run["error"] else ""))
    rows = []
    for step in run["steps"]:
        attempts = ", ".join(f"{a['node']}#{a['fence']} {a['state']}" for a in step["attempts"])
        rows.append([step["id"], step["state"], attempts, step["error"]])
    _table("steps", ["step", "state", "attempts (node#fence state)", "error"], rows)


def _run_action(action: str, run_id: str, reason: str, as_json: bool, hub: Optional[str], token_file: Optional[Path],
                data: Optional[Path]) -> None:
    run = Client(hub, token_file, data).call("POST", f"/runs/{run_id}/{action}", json={"reason": reason})
    typer.echo(json.dumps(run) if as_json else f"{run['id']} {run['state']}")


@run_app.command("cancel")
def run_cancel(run_id: str, reason: str = typer.Option("", help="Why"), as_json: bool = JsonOpt,
               hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
               token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Cancel a run: running attempts are told to stop."""
    _run_action("cancel", run_id, reason, as_json, hub, token_file, data)


@run_app.command("fail")
def run_fail(run_id: str, reason: str = typer.Option("", help="Why"), as_json: bool = JsonOpt,
             hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
             token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Force a run to fail now."""
    _run_action("fail", run_id, reason, as_json, hub, token_file, data)


# -- nodes -------------------------------------------------------------------------------------------------------

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


# -- schema ------------------------------------------------------------------------------------------------------

@schema_app.command("workflow")
def schema_workflow() -> None:
    """The JSON Schema of workflow files."""
    from .workflow import Workflow

    typer.echo(json.dumps(Workflow.model_json_schema(by_alias=True), indent=2))


@schema_app.command("policy")
def schema_policy() -> None:
    """The JSON Schema of the hub's adaptation policy file (--policy)."""
    from .health import Policy

    typer.echo(json.dumps(Policy.model_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(hub_app, name="hub")
    app.add_typer(run_app, name="run")
    app.add_typer(nodes_app, name="nodes")
    app.add_typer(schema_app, name="schema")
    from .validate import validate_command

    app.command("validate")(validate_command)
