"""`fleetflow run submit|list|show|cancel|fail`: workflow runs, through the hub's API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from .client import TERMINAL, Client, DataOpt, HubOpt, JsonOpt, TokenFileOpt, TokenOpt, _parse_inputs, _table, fail

run_app = typer.Typer(help="Submit and follow workflow runs.", no_args_is_help=True)


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
