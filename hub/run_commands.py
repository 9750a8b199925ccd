"""`fleetflow run submit|list|show|cancel|fail`: workflow runs, through the hub's API."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from .client import (TERMINAL, Client, DataOpt, Format, HubOpt, JsonOpt, OutputOpt, TokenFileOpt, TokenOpt, WatchOpt,
                     WatchTimeoutOpt, _parse_inputs, ago, duration, emit, fail, iso, now_ms, output_format, table,
                     watch, when)

run_app = typer.Typer(help="Submit and follow workflow runs.", no_args_is_help=True)


@run_app.command("submit")
def run_submit(workflow: Path = typer.Argument(..., help="Workflow YAML file"),
               input_: list[str] = typer.Option([], "--input", help="NAME=VALUE (JSON values allowed), repeatable"),
               wait: bool = typer.Option(False, "--wait", help="Wait until the run ends, printing each step's "
                                                               "progress on stderr; exit 1 unless it succeeded"),
               timeout: float = typer.Option(600.0, "--timeout", help="With --wait: give up after S seconds"),
               key: Optional[str] = typer.Option(None, "--key", help="Idempotency key"),
               force: bool = typer.Option(False, "--force", help="Submit even if `fleetflow validate` rejects it"),
               as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt, hub: Optional[str] = HubOpt,
               token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
               data: Optional[Path] = DataOpt) -> None:
    """Submit a workflow run; it is checked as `fleetflow validate` checks it first."""
    fmt = output_format(output, as_json)
    inputs = _parse_inputs(input_)
    _check(workflow, force)
    client = Client(hub, token_file, data)
    headers = {"Idempotency-Key": key} if key else {}
    created = client.call("POST", "/runs", json={"workflow": workflow.read_text(), "inputs": inputs}, headers=headers)
    run_id = created["id"]
    if not wait:
        if fmt in ("json", "yaml"):
            emit({"id": run_id}, fmt, lambda d, wide: str(d))
        else:
            typer.echo(run_id)
        return
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        run = client.call("GET", f"/runs/{run_id}")
        _progress(run, seen)  # stderr: stdout keeps just the final line (or document)
        if run["state"] in TERMINAL:
            break
        if time.monotonic() > deadline:
            fail(f"run {run_id} still {run['state']} after {timeout:g} s", 1)
        time.sleep(0.2)
    if fmt in ("json", "yaml"):
        emit(run, fmt, _run_text)
    else:
        typer.echo(f"{run_id} {run['state']}" + (f": {run['error']}" if run["error"] else ""))
    if run["state"] != "succeeded":
        raise typer.Exit(1)


def _check(workflow: Path, force: bool) -> None:
    """Refuse what `fleetflow validate` refuses (exit 1), before anything is sent; --force sends it anyway."""
    from .validate import validate
    from .workflow import WorkflowError

    try:
        _, report = validate(workflow)
    except WorkflowError as exc:  # it does not even parse: the hub would refuse it too, --force or not
        for where, what in exc.problems:
            typer.echo(f"{where}: {what}", err=True)
        raise typer.Exit(1)
    for warning in report.warnings:
        typer.echo(report.located(warning, "warning"), err=True)
    for error in report.errors:
        typer.echo(report.located(error, "error"), err=True)
    if report.errors and not force:
        fail(f"{workflow} not submitted: `fleetflow validate` rejects it (--force submits it anyway)", 1)
    if report.errors:
        typer.echo(f"{workflow}: submitting anyway (--force)", err=True)


def _progress(run: dict[str, Any], seen: dict[str, str]) -> None:
    """Print each step's news on stderr as it happens: placed, running, done, or why it waits."""
    for step in run.get("steps", []):
        news = _step_news(step)
        if news is None:
            continue
        # A waiting reason counts down ("ready in 3.2 s"): the same reason with other figures is not news.
        key = re.sub(r"\d+(\.\d+)?", "#", news)
        if seen.get(step["id"]) != key:
            seen[step["id"]] = key
            typer.echo(f"{run['id']}: step {step['id']}: {news}", err=True)


def _step_news(step: dict[str, Any]) -> Optional[str]:
    state, attempts = step["state"], step["attempts"]
    last = attempts[-1] if attempts else None
    where = f" on {last['node']} (attempt {last['id']})" if last else ""
    if state == "queued":
        return f"waiting: {step['waiting']}" if step.get("waiting") else "queued"
    if state == "placed" and last is not None:
        verb = {"assigned": "assigned to", "accepted": "accepted by"}.get(last["state"], last["state"] + " on")
        return f"{verb} {last['node']} (attempt {last['id']})"
    if state == "succeeded":
        return "succeeded" + where + (f" in {_took(last, now_ms())}" if last and last["started_at"] else "")
    if state in ("failed", "cancelled", "skipped"):
        return state + (f": {step['error']}" if step["error"] else "")
    return None if state == "pending" else state


# -- list and show -------------------------------------------------------------------------------------------------

@run_app.command("list")
def run_list(state: Optional[str] = typer.Option(None, help="Only runs in this state"), as_json: bool = JsonOpt,
             output: Optional[Format] = OutputOpt, watch_: bool = WatchOpt,
             watch_timeout: Optional[float] = WatchTimeoutOpt, hub: Optional[str] = HubOpt,
             token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
             data: Optional[Path] = DataOpt) -> None:
    """List runs, newest first."""
    show_or_watch(Client(hub, token_file, data), "/runs", output_format(output, as_json), _runs_text, watch_,
                  watch_timeout, params={"state": state} if state else {})


def show_or_watch(client: Client, path: str, fmt: Format, text: Callable[[Any, bool], str], watch_: bool,
                  watch_timeout: Optional[float], params: Optional[dict[str, str]] = None,
                  done: Optional[Callable[[Any], bool]] = None) -> None:
    """Print what `GET path` answers; with --watch, again at every change until Ctrl-C or `done` (the list and
    show commands of runs and deployments)."""
    def fetch() -> Any:
        return client.call("GET", path, params=params or {})

    if watch_:
        watch(fetch, fmt, text, timeout=watch_timeout, done=done)
    else:
        emit(fetch(), fmt, text)


def _runs_text(runs: list[dict[str, Any]], wide: bool) -> str:
    now = now_ms()
    columns = ["id", "workflow", "version", "state", "age", "duration", "error"]
    if wide:
        columns[5:5] = ["submitted", "finished"]
    rows = []
    for r in runs:
        row = [r["id"], r["workflow"], r["version"], r["state"], duration(now - r["submitted_at"]),
               duration((r["finished_at"] or now) - r["submitted_at"]), r["error"]]
        if wide:
            row[5:5] = [iso(r["submitted_at"]), iso(r["finished_at"])]
        rows.append(row)
    return table(columns, rows)


@run_app.command("show")
def run_show(run_id: str, as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt, watch_: bool = WatchOpt,
             watch_timeout: Optional[float] = WatchTimeoutOpt, hub: Optional[str] = HubOpt,
             token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
             data: Optional[Path] = DataOpt) -> None:
    """Show a run: its steps, where and in which attempt each ran, outputs, errors, and why a step waits.

    With --watch it ends by itself once the run has ended."""
    show_or_watch(Client(hub, token_file, data), f"/runs/{run_id}", output_format(output, as_json), _run_text, watch_,
                  watch_timeout, done=lambda run: run["state"] in TERMINAL)


def _run_text(run: dict[str, Any], wide: bool) -> str:
    now = now_ms()
    submitted, finished = run["submitted_at"], run["finished_at"]
    lines = [f"run {run['id']}  {run['workflow']} {run['version']}  {run['state']}",
             f"  submitted: {when(submitted, now)}"]
    if finished is not None:
        lines.append(f"  finished:  {when(finished, now)}, took {duration(finished - submitted)}")
    else:
        lines.append(f"  running:   {duration(now - submitted)}")
        if run.get("deadline"):
            lines.append(f"  deadline:  {when(run['deadline'], now)}")
    if run["error"]:
        lines.append(f"  error:     {run['error']}")
    if run.get("inputs"):
        lines.append(f"  inputs:    {json.dumps(run['inputs'])}")
    if run.get("archived"):
        lines.append("  (archived: only its summary is kept; the hub's journal has the rest)")
    if run.get("steps"):
        lines += ["", "steps:"]
    for step in run.get("steps", []):
        lines += _step_lines(step, wide, now)
    return "\n".join(lines)


def _step_lines(step: dict[str, Any], wide: bool, now: int) -> list[str]:
    attempts = step["attempts"]
    last = attempts[-1] if attempts else None
    head = f"  {step['id']}  {step['state']}" + (f" ({step['kind']})" if step.get("kind", "step") != "step" else "")
    if last is not None:
        head += f"  on {last['node']}  attempt {last['id']} (fence {last['fence']}"
        head += f", {len(attempts)} attempts)" if len(attempts) > 1 else ")"
        if last["started_at"]:
            head += f"  {'took' if last['ended_at'] else 'running for'} {_took(last, now)}"
    lines = [head]
    if step.get("waiting"):
        lines.append(f"      waiting: {step['waiting']}")
    if step["output"] is not None:
        lines.append(f"      output: {json.dumps(step['output'])}")
    if step["error"]:
        lines.append(f"      error: {step['error']}")
    if wide or len(attempts) > 1:
        for a in attempts:
            line = f"      attempt {a['id']} on {a['node']} (fence {a['fence']}): {a['state']}"
            line += f" {ago(a['ended_at'], now)}" if a["ended_at"] else ""
            line += f": {a['reason']}" if a["reason"] else ""
            if wide:
                line += (f"  [assigned {iso(a['assigned_at'])}, started {iso(a['started_at'])}, "
                         f"ended {iso(a['ended_at'])}]")
            lines.append(line)
    return lines


def _took(attempt: Optional[dict[str, Any]], now: int) -> str:
    if attempt is None or not attempt["started_at"]:
        return "-"
    return duration((attempt["ended_at"] or now) - attempt["started_at"])


# -- actions -------------------------------------------------------------------------------------------------------

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
