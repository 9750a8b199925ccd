"""`fleetflow agent run` and `fleetflow agent identity`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .config import ConfigError, load_config
from .daemon import exec_daemon
from .identity import Identity, IdentityError
from .runtime.console import fail
from .runtime.keys import KeyFileError

agent_app = typer.Typer(help="Run the device agent and show its identity.", no_args_is_help=True)


@agent_app.command("run")
def agent_run(
        broker: Optional[str] = typer.Option(None, help="mqtt://HOST:PORT or mqtts://HOST:PORT [FLEETFLOW_BROKER]"),
        fleet: Optional[str] = typer.Option(None, help="Fleet id [FLEETFLOW_FLEET]"),
        node_id: Optional[str] = typer.Option(None, "--node-id", help="This node's id [FLEETFLOW_NODE_ID]"),
        data: Optional[Path] = typer.Option(None, help="Data directory: key, identity, outbox [FLEETFLOW_DATA]"),
        profile: Optional[str] = typer.Option(None, help="Firmware profile name [FLEETFLOW_PROFILE]"),
        label: list[str] = typer.Option([], "--label", help="k=v, repeatable [FLEETFLOW_LABELS=k=v,k2=v2]"),
        hub_key: Optional[str] = typer.Option(None, "--hub-key", help="Hub public key: hex or file [FLEETFLOW_HUB_KEY]"),
        trust_first_hub_key: Optional[bool] = typer.Option(
            None, "--trust-first-hub-key", help="No --hub-key: pin the first hub state seen (insecure: anyone who can "
                                                "publish it first becomes this node's hub) [FLEETFLOW_TRUST_FIRST_HUB_KEY]"),
        config: Optional[Path] = typer.Option(None, "--config", help="TOML config file [FLEETFLOW_CONFIG]"),
        username: Optional[str] = typer.Option(None, help="Broker username (password: FLEETFLOW_PASSWORD or file)"),
        ca_file: Optional[str] = typer.Option(None, "--ca-file", help="CA certificate for mqtts://"),
        cert_file: Optional[str] = typer.Option(None, "--cert-file", help="Client certificate for mqtts://"),
        key_file: Optional[str] = typer.Option(None, "--key-file", help="Client certificate key for mqtts://"),
        heartbeat: Optional[float] = typer.Option(None, help="Heartbeat interval, s (default: the profile's)"),
        telemetry: Optional[float] = typer.Option(None, help="Telemetry interval, s (default: the profile's)"),
        max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="Concurrent steps"),
        grace_period: Optional[float] = typer.Option(None, "--grace-period", help="SIGTERM grace for steps, s"),
        # Refused with a hint (exit 2): a secret on the command line is visible to every user (ps).
        enroll_token: Optional[str] = typer.Option(None, "--enroll-token", hidden=True),
        enroll_token_file: Optional[Path] = typer.Option(
            None, "--enroll-token-file", help="File (mode 0600) holding the enroll token the hub admits nodes with "
                                              "[FLEETFLOW_ENROLL_TOKEN, FLEETFLOW_ENROLL_TOKEN_FILE]"),
        telemetry_file: Optional[str] = typer.Option(None, "--telemetry-file",
                                                     help="JSON map overriding reported metrics (tests, demos)"),
        log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
) -> None:
    """Run the agent until SIGTERM or SIGINT (then it drains and publishes its death)."""
    flags = {"broker": broker, "fleet": fleet, "node_id": node_id, "data": data, "profile": profile,
             "labels": label, "hub_key": hub_key,
             "trust_first_hub_key": trust_first_hub_key, "username": username, "ca_file": ca_file, "cert_file": cert_file,
             "key_file": key_file, "heartbeat": heartbeat, "telemetry": telemetry, "max_concurrent": max_concurrent,
             "grace_period": grace_period, "enroll_token": enroll_token, "enroll_token_file": enroll_token_file,
             "telemetry_file": telemetry_file}
    try:
        settings = load_config({k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}, config)
    except ConfigError as exc:
        fail(str(exc), 2)
    if log_level.lower() not in ("debug", "info", "warning", "error"):
        fail(f"--log-level {log_level!r}: use debug, info, warning or error", 2)
    exec_daemon(settings, log_level)


@agent_app.command("identity")
def agent_identity(data: Path = typer.Option(..., help="The agent's data directory"),
                   as_json: bool = typer.Option(False, "--json", help="Print JSON")) -> None:
    """Print this node's id, kid and public key (creates nothing)."""
    try:
        identity = Identity.open(data)
    except (IdentityError, KeyFileError) as exc:
        fail(str(exc), 2)
    info = identity.describe()
    identity.close()
    if as_json:
        typer.echo(json.dumps(info))
    else:
        for key, value in info.items():
            typer.echo(f"{key:11s} {value}")


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
