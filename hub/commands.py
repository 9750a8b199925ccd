"""Hub commands: `fleetflow hub run|identity`, `schema workflow|policy`, `validate`; `register` adds them, with the
client commands of hub/run_commands.py and hub/node_commands.py, to the root command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .client import _meta, fail, refuse_secret_flag
from .limits import DEFAULT_LIMITS, MAX_DEPTH
from .registry import DEFAULT_MAX_PENDING, DEFAULT_TOKEN_USES

hub_app = typer.Typer(help="Run the hub and show its identity.", no_args_is_help=True)
schema_app = typer.Typer(help="Print JSON Schemas.", no_args_is_help=True)


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
    from .node_commands import nodes_app
    from .run_commands import run_app

    app.add_typer(run_app, name="run")
    app.add_typer(nodes_app, name="nodes")
    app.add_typer(schema_app, name="schema")
    from .validate import validate_command

    app.command("validate")(validate_command)
