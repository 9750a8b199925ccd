"""Hub commands: `fleetflow hub run|identity|rotate-key|rotate-token`, `schema workflow|policy`, `validate`; `register` adds them, with the
client commands of hub/run_commands.py, hub/node_commands.py, hub/token_commands.py and hub/deployment_commands.py
(`deploy`, `deployments`), the audit commands of
hub/audit_commands.py and `broker config` (hub/broker_commands.py), to the root command. Rotations done here on the data directory are audited (hub/audit.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from agent.runtime.console import fail

from . import gc_policy
from .client import _meta, refuse_secret_flag
from .keys import DEFAULT_KEY_OVERLAP, DEFAULT_TOKEN_OVERLAP
from .config import DEFAULT_KEEPALIVE_S, DEFAULT_MIRROR_INTERVAL_S, DEFAULT_NODE_METRICS_MAX
from .limits import DEFAULT_LIMITS, MAX_DEPTH, OPTIONS
from .registry import DEFAULT_MAX_PENDING, DEFAULT_TOKEN_USES

hub_app = typer.Typer(help="Run the hub, show its identity, rotate its key and API token.", no_args_is_help=True)
schema_app = typer.Typer(help="Print JSON Schemas.", no_args_is_help=True)


EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error; systemd's Restart=on-failure restarts it


# -- hub run / identity ----------------------------------------------------------------------------------------

def _limit_option(limit: str, what: str, bound: str = "") -> Any:
    """The `hub run` option of one of hub/limits.py's `Limits`: the flag its refusals name (`limits.OPTIONS`), with
    its default and its FLEETFLOW_* variable in the help."""
    flag = OPTIONS[limit]
    variable = "FLEETFLOW_" + flag.removeprefix("--").replace("-", "_").upper()
    return typer.Option(None, flag, help=f"{what} (default: {getattr(DEFAULT_LIMITS, limit)}{bound}) [{variable}]")


@hub_app.command("run")
def hub_run(broker: Optional[str] = typer.Option(
                None, help="mqtt://HOST:PORT or mqtts://HOST:PORT (with --embedded-broker: where to listen) "
                           "[FLEETFLOW_BROKER]"),
            fleet: Optional[str] = typer.Option(None, help="Fleet id [FLEETFLOW_FLEET]"),
            data: Optional[Path] = typer.Option(None, help="Data directory: key, journal, registry, API token "
                                                           "[FLEETFLOW_DATA]"),
            config_file: Optional[Path] = typer.Option(None, "--config", help="TOML config file; flags override "
                                                                              "FLEETFLOW_* variables, which override "
                                                                              "it [FLEETFLOW_CONFIG]"),
            api: Optional[str] = typer.Option(None, help="HOST:PORT of the HTTP API (port 0: any free port) "
                                                         "(default: 127.0.0.1:8470) [FLEETFLOW_API]"),
            auto_accept: Optional[bool] = typer.Option(None, "--auto-accept", help="Accept every enroll request "
                                                                                   "(labs) [FLEETFLOW_AUTO_ACCEPT]"),
            embedded_broker: Optional[bool] = typer.Option(None, "--embedded-broker", help=(
                "Start an amqtt broker in-process (labs) [FLEETFLOW_EMBEDDED_BROKER]")),
            enroll_token: Optional[str] = typer.Option(
                None, "--enroll-token", hidden=True,
                callback=refuse_secret_flag("--enroll-token", "FLEETFLOW_ENROLL_TOKEN or --enroll-token-file FILE")),
            enroll_token_file: Optional[Path] = typer.Option(
                None, "--enroll-token-file", help="File (mode 0600) holding a token that admits nodes proving they "
                                                  "hold it [FLEETFLOW_ENROLL_TOKEN, FLEETFLOW_ENROLL_TOKEN_FILE]"),
            enroll_token_uses: Optional[int] = typer.Option(
                None, "--enroll-token-uses",
                help=f"Enrollments the enroll token may admit, counted across restarts (a node asking again with "
                     f"its enrolled key uses none) (default: {DEFAULT_TOKEN_USES}) [FLEETFLOW_ENROLL_TOKEN_USES]"),
            max_pending: Optional[int] = typer.Option(
                None, "--max-pending", help=f"Pending enroll requests kept; beyond, the oldest is dropped "
                                            f"(default: {DEFAULT_MAX_PENDING}) [FLEETFLOW_MAX_PENDING]"),
            username: Optional[str] = typer.Option(None, help="Broker username (password: FLEETFLOW_PASSWORD or the "
                                                              "config file) [FLEETFLOW_USERNAME]"),
            ca_file: Optional[str] = typer.Option(None, "--ca-file", help="CA for mqtts:// [FLEETFLOW_CA_FILE]"),
            cert_file: Optional[str] = typer.Option(None, "--cert-file", help="Client certificate for a broker that "
                                                                              "requires one [FLEETFLOW_CERT_FILE]"),
            key_file: Optional[str] = typer.Option(None, "--key-file", help="Key of the client certificate "
                                                                            "[FLEETFLOW_KEY_FILE]"),
            keepalive: Optional[int] = typer.Option(
                None, "--keepalive", metavar="S", help=f"MQTT keepalive of the hub's broker sessions, s "
                f"(default: {DEFAULT_KEEPALIVE_S}) [FLEETFLOW_KEEPALIVE]"),
            policy: Optional[Path] = typer.Option(None, "--policy", help="Adaptation policy YAML (health, rules) "
                                                                         "[FLEETFLOW_POLICY]"),
            max_request_bytes: Optional[int] = _limit_option("request_bytes", "Largest HTTP request body (413 beyond)"),
            max_workflow_bytes: Optional[int] = _limit_option(
                "workflow_bytes", "Largest workflow YAML text (422 beyond, as the limits below)"),
            max_workflow_steps: Optional[int] = _limit_option("steps", "Most steps in one workflow"),
            max_workflow_depth: Optional[int] = _limit_option(
                "depth", "Deepest nesting in a workflow or its inputs", f", at most {MAX_DEPTH}"),
            max_workflow_aliases: Optional[int] = _limit_option("aliases", "Most YAML aliases (*name) in one workflow"),
            max_workflow_nodes: Optional[int] = _limit_option(
                "nodes", "Most values in a workflow or its inputs, YAML aliases expanded"),
            log_level: Optional[str] = typer.Option(None, "--log-level", help="debug, info, warning or error "
                                                                              "(default: info) [FLEETFLOW_LOG_LEVEL]"),
            json_mirror: Optional[bool] = typer.Option(
                None, "--json-mirror", help="Publish retained, unauthenticated JSON copies of each node's state and "
                                            "telemetry under fleetflow/v1/FLEET/json/ (docs/integrations.md) "
                                            "[FLEETFLOW_JSON_MIRROR]"),
            json_mirror_interval: Optional[float] = typer.Option(
                None, "--json-mirror-interval", help=f"Seconds between two JSON mirror updates of one node's topic, at "
                f"least (default: {DEFAULT_MIRROR_INTERVAL_S:g}) [FLEETFLOW_JSON_MIRROR_INTERVAL]"),
            node_metrics: Optional[bool] = typer.Option(
                None, "--node-metrics", help="Export each node's latest CPU, memory, disk and temperature on /metrics "
                                             "[FLEETFLOW_NODE_METRICS]"),
            node_metrics_max: Optional[int] = typer.Option(
                None, "--node-metrics-max", help=f"At most this many nodes get per-node gauges; the rest are "
                f"counted in fleetflow_node_metrics_left_out (default: {DEFAULT_NODE_METRICS_MAX}) "
                f"[FLEETFLOW_NODE_METRICS_MAX]"),
            sparkplug: Optional[bool] = typer.Option(
                None, "--sparkplug", help="Be a Sparkplug B 3.0 Edge Node, each node one of its Devices, over an MQTT "
                                          "session of its own (hub/sparkplug/README.md) [FLEETFLOW_SPARKPLUG]"),
            sparkplug_group: Optional[str] = typer.Option(
                None, "--sparkplug-group", metavar="G", help="Sparkplug group id (default: fleetflow) "
                                                             "[FLEETFLOW_SPARKPLUG_GROUP]"),
            sparkplug_host: Optional[str] = typer.Option(
                None, "--sparkplug-host", metavar="HOST_ID", help="Primary host application: births wait for its "
                "STATE to say online [FLEETFLOW_SPARKPLUG_HOST]"),
            sparkplug_node_id: Optional[str] = typer.Option(
                None, "--sparkplug-node-id", metavar="ID", help="Sparkplug edge node id (default: the fleet id) "
                                                  "[FLEETFLOW_SPARKPLUG_NODE_ID]"),
            sparkplug_deadband: Optional[str] = typer.Option(
                None, "--sparkplug-deadband", metavar="METRIC=N,...", help="Change a telemetry metric must exceed to "
                "be sent again (default: cpu=2,mem=1,disk=1,temp=0.5; 0: every change) [FLEETFLOW_SPARKPLUG_DEADBAND]"),
            sparkplug_commands: Optional[bool] = typer.Option(
                None, "--sparkplug-commands", help="Act on DCMD writes of Device Control/Drain (refused otherwise); "
                "restrict who may publish DCMD with broker ACLs [FLEETFLOW_SPARKPLUG_COMMANDS]"),
            broker_admin_file: Optional[Path] = typer.Option(
                None, "--broker-admin-file", help="JSON login (mode 0600) of a Mosquitto dynamic-security admin: the "
                "hub gives each node it accepts a broker login of its own and disables it on revoke "
                "(fleetflow broker config writes it) [FLEETFLOW_BROKER_ADMIN_FILE]"),
            ingest_workers: Optional[int] = typer.Option(
                None, "--ingest-workers", metavar="N", help="Verify and decode node messages in N processes on an MQTT "
                "shared subscription (a broker that has them, e.g. Mosquitto 2; hub/ingest/README.md); 0: in this "
                "process (default: 0) [FLEETFLOW_INGEST_WORKERS]")
            ) -> None:
    """Run the hub until SIGTERM or SIGINT. Every setting also comes from FLEETFLOW_<NAME> or the --config file
    (names as the flags, with underscores)."""
    from .config import ConfigError, load_hub_settings
    from .health import Policy, load_policy
    from .workflow import WorkflowError

    from agent.runtime.keys import KeyFileError
    from agent.runtime.startup import StartupError

    from .errors import HubTaskFailed, OperatorError
    from .service import Hub

    flags = {"broker": broker, "fleet": fleet, "data": data, "api": api, "auto_accept": auto_accept,
             "embedded_broker": embedded_broker, "enroll_token_file": enroll_token_file,
             "enroll_token_uses": enroll_token_uses, "max_pending": max_pending, "username": username,
             "ca_file": ca_file, "cert_file": cert_file, "key_file": key_file, "keepalive": keepalive,
             "policy": policy,
             "max_request_bytes": max_request_bytes, "max_workflow_bytes": max_workflow_bytes,
             "max_workflow_steps": max_workflow_steps, "max_workflow_depth": max_workflow_depth,
             "max_workflow_aliases": max_workflow_aliases, "max_workflow_nodes": max_workflow_nodes,
             "log_level": log_level, "json_mirror": json_mirror, "json_mirror_interval": json_mirror_interval,
             "node_metrics": node_metrics, "node_metrics_max": node_metrics_max, "sparkplug": sparkplug,
             "sparkplug_group": sparkplug_group, "sparkplug_host": sparkplug_host,
             "sparkplug_node_id": sparkplug_node_id, "sparkplug_deadband": sparkplug_deadband,
             "sparkplug_commands": sparkplug_commands, "broker_admin_file": broker_admin_file,
             "ingest_workers": ingest_workers}
    try:
        settings = load_hub_settings({k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()},
                                     config_file)
    except ConfigError as exc:
        fail(str(exc), 2)
    try:
        rules = load_policy(settings.policy) if settings.policy else Policy()
    except WorkflowError as exc:
        for where, what in exc.problems:
            typer.echo(f"{where}: {what}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=getattr(logging, settings.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = settings.hub_config(rules)

    async def main() -> None:
        from .embedded_broker import start_embedded_broker

        embedded = await start_embedded_broker(settings.broker) if settings.embedded_broker else None
        try:
            gc_policy.for_throughput()
            hub = Hub(config)  # loads the journal (snapshot and tail) and the registry
            gc_policy.freeze_loaded()
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
    except StartupError as exc:  # data directory in use or not writable, broker unreachable at the first connection
        fail(str(exc), 1)
    except OSError as exc:
        fail(f"cannot start: {exc}", 1)
    except HubTaskFailed as exc:  # logged with its traceback; a supervisor restarts the hub from its journal
        fail(f"{exc}; the hub stopped (restart it: it resumes from its journal)", EXIT_SOFTWARE)


@hub_app.command("identity")
def hub_identity(data: Path = typer.Option(..., help="The hub's data directory"),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """Print the hub's public key (give it to agents as --hub-key), API URL and token file."""
    from agent.runtime.keys import KeyFileError, load_key

    try:
        key = load_key(data / "hub.key")
    except KeyFileError as exc:
        fail(f"{exc} (is {data} a hub data directory?)", 2)
    meta = _meta(data)
    info = {"public_key": bytes(key.verify_key).hex(), "api": meta.get("api"), "token_file": str(data / "api.token"),
            "fleet": meta.get("fleet")}
    info.update(_rotation_info(data))
    typer.echo(json.dumps(info) if as_json else "\n".join(f"{k:11s} {v}" for k, v in info.items()))


def _rotation_info(data: Path) -> dict[str, Any]:
    """A key rotation under way, as `hub identity` shows it (nothing when there is none)."""
    from agent.runtime.keys import KeyFileError

    from .keys import read_rotation, utc

    try:
        rotation = read_rotation(data)
    except KeyFileError as exc:
        return {"next_key": f"unreadable: {exc}"}
    if rotation is None:
        return {}
    switch = utc(rotation.switch_at) if rotation.switch_at is not None else "not announced yet"
    return {"next_key": rotation.next_key.hex(), "next_kid": rotation.kid, "switch_at": switch}


# -- hub rotate-key / rotate-token: files in the data directory, picked up by a running hub ------------------------

def _overlap(value: str) -> float:
    from .keys import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        fail(f"--overlap: {exc}", 2)


def _hub_data(data: Path, needs: str) -> None:
    if not (data / needs).exists():
        fail(f"{data} holds no {needs} (is it a hub data directory?)", 2)


@hub_app.command("rotate-key")
def hub_rotate_key(data: Path = typer.Option(..., help="The hub's data directory"),
                   overlap: str = typer.Option(DEFAULT_KEY_OVERLAP, help="How long the hub announces the next key before it signs "
                                                           "with it, from its first announcement: as long as a node "
                                                           "may stay offline (90s, 30m, 24h, 7d)"),
                   as_json: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """Make the hub's next signing key (mode 0600). The hub announces it to the nodes, running or at its next start,
    and signs with it once the overlap has passed; nodes that trust the current key follow without reconfiguring."""
    from agent.runtime.keys import KeyFileError, load_key
    from agent.runtime.clock import now_ms

    from .keys import NEXT_KEY_FILE, RotationError, human, start_key_rotation

    seconds = _overlap(overlap)
    _hub_data(data, "hub.key")
    try:
        previous = bytes(load_key(data / "hub.key").verify_key)
        rotation = start_key_rotation(data, seconds, now_ms())
    except KeyFileError as exc:
        fail(str(exc), 2)
    except RotationError as exc:
        fail(str(exc), 1)
    except OSError as exc:
        fail(f"cannot write the next key in {data}: {exc.strerror or exc}", 1)
    info = {"next_key": rotation.next_key.hex(), "next_kid": rotation.kid, "overlap_s": seconds,
            "file": str(data / NEXT_KEY_FILE)}
    # Signed by the next key, naming the current one: `audit verify` trusts the older key's entries through it.
    _audit(data, "hub.rotate-key", rotation.kid, {"previous_key": previous.hex(), "next_key": rotation.next_key.hex(),
                                                  "overlap_s": seconds}, _next_key(data, rotation.next_key))
    if as_json:
        typer.echo(json.dumps(info))
        return
    typer.echo(f"next hub key: kid {rotation.kid}, public key {rotation.next_key.hex()} ({info['file']}, mode 0600)\n"
               f"The hub announces it in its hub state (at once if it runs, else when it starts) and signs with it "
               f"{human(seconds)} after the first announcement. Nodes that trust the current key follow by "
               f"themselves; one that stays offline that long needs --hub-key {rotation.next_key.hex()}.")


@hub_app.command("rotate-token")
def hub_rotate_token(data: Path = typer.Option(..., help="The hub's data directory"),
                     overlap: str = typer.Option(DEFAULT_TOKEN_OVERLAP, help="How long the previous token stays accepted (0: refused "
                                                            "at once)"),
                     as_json: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """Write a new API token to DATA/api.token (mode 0600); the previous one stays accepted for the overlap. A
    running hub takes both at its next request; clients given --data read the new one."""
    from agent.runtime.keys import KeyFileError
    from agent.runtime.clock import now_ms

    from .keys import RotationError, human, rotate_token, utc

    seconds = _overlap(overlap)
    _hub_data(data, "api.token")
    try:
        previous = rotate_token(data, seconds, now_ms())
    except KeyFileError as exc:
        fail(str(exc), 2)
    except RotationError as exc:
        fail(str(exc), 1)
    except OSError as exc:
        fail(f"cannot write the new token in {data}: {exc.strerror or exc}", 1)
    info = {"token_file": str(data / "api.token"), "previous_until": utc(previous.until), "overlap_s": seconds}
    _audit(data, "hub.rotate-token", "admin", {"overlap_s": seconds, "previous_until": previous.until})
    typer.echo(json.dumps(info) if as_json else
               f"new API token in {info['token_file']} (mode 0600); the previous token is accepted until "
               f"{info['previous_until']} ({human(seconds)}), then refused")


def _next_key(data: Path, public: bytes) -> Any:
    """The private key a rotation just made: hub.key.next, or hub.key if a running hub has switched to it already
    (an overlap of 0)."""
    from agent.runtime.keys import KeyFileError, load_key

    for name in ("hub.key.next", "hub.key"):
        try:
            key = load_key(data / name)
        except KeyFileError:
            continue
        if bytes(key.verify_key) == public:
            return key
    fail(f"the next key is made (see {data / 'key-rotation.json'}), but it is no longer in {data} to sign its "
         f"audit entry", 1)


def _audit(data: Path, action: str, target: str, params: dict[str, Any], key: Any = None) -> None:
    """An entry in the hub's audit log for an action done here on the data directory (hub/audit.py)."""
    from agent.runtime.keys import KeyFileError

    from .audit import AuditError, append_local

    try:
        append_local(data, action, target, params, key)
    except (KeyFileError, AuditError, OSError) as exc:
        fail(f"{action} is done, but its audit entry cannot be written in {data}: {exc}", 1)


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
    from .audit_commands import audit_app
    from .journal_commands import journal_app
    from .token_commands import token_app

    app.add_typer(token_app, name="token")
    app.add_typer(audit_app, name="audit")
    app.add_typer(journal_app, name="journal")
    from .validate import validate_command

    app.command("validate")(validate_command)
    from .broker_commands import broker_app

    app.add_typer(broker_app, name="broker")
    from .artifacts.commands import artifacts_app

    app.add_typer(artifacts_app, name="artifacts")
    from .deployment_commands import deploy_command, deployments_app

    app.command("deploy")(deploy_command)
    app.add_typer(deployments_app, name="deployments")
