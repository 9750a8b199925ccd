"""`fleetflow deploy WF.yaml --target SELECTOR [...]` and `fleetflow deployments list|show|pause|resume|cancel`:
fleet deployments (hub/deployments/, docs/deployments.md), through the hub's API.

`deploy` checks the workflow as `fleetflow validate` does and every flag as the hub will (the same parser, naming
the flag: exit 2) before it asks; the hub checks again, with the label keys its fleet knows (422: exit 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .client import (Client, DataOpt, Format, HubOpt, JsonOpt, OutputOpt, TokenFileOpt, TokenOpt, WatchOpt,
                     WatchTimeoutOpt, _parse_inputs, ago, duration, emit, fail, iso, now_ms, output_format, table,
                     when)
from .run_commands import _check, show_or_watch

deployments_app = typer.Typer(help="Follow, pause, resume and cancel deployments.", no_args_is_help=True)
BAR = 20  # characters of a wave's progress bar
ENDED = ("succeeded", "aborted", "canceled")
LIVE = ("queued", "in_progress", "verifying", "rolling_back")


def deploy_command(
        workflow: Path = typer.Argument(..., help="Workflow YAML file with a version (what is deployed)"),
        target: list[str] = typer.Option([], "--target", "-t", help="Which nodes, all must hold: profile=X, cap=X, "
                                         "node=a,b,c, label.KEY=VALUE, KEY=VALUE (a label key the fleet knows) or "
                                         "all; repeatable"),
        input_: list[str] = typer.Option([], "--input", help="NAME=VALUE (JSON values allowed), repeatable"),
        rate: Optional[str] = typer.Option(None, "--rate", help="Constant rate: N/min (1-1000); default: no limit"),
        base_rate: Optional[str] = typer.Option(None, "--base-rate", help="Exponential rate: start at N/min"),
        increment_factor: Optional[float] = typer.Option(None, "--increment-factor",
                                                         help="Exponential: multiply the rate by F (1.1-5)"),
        grow_after_notified: Optional[int] = typer.Option(None, "--grow-after-notified",
                                                          help="Exponential: each time N more nodes started"),
        grow_after_succeeded: Optional[int] = typer.Option(None, "--grow-after-succeeded",
                                                           help="Exponential: each time N more nodes succeeded"),
        max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent",
                                                     help="At most N nodes in progress, verifying or rolling back"),
        waves: Optional[str] = typer.Option(None, "--waves", help="Cumulative wave sizes, counts or percents: "
                                                                 "1,10%,50%,100% (default 100%)"),
        wave_success: Optional[float] = typer.Option(None, "--wave-success", help="Percent of a wave that must "
                                                     "succeed before the next starts, else abort (default 100)"),
        pause_between: bool = typer.Option(False, "--pause-between", help="After each wave, wait for "
                                           "`deployments resume`"),
        abort_type: Optional[str] = typer.Option(None, "--abort-type", help="FAILED, REJECTED, TIMED_OUT or ALL "
                                                                           "(default ALL)"),
        abort_min_executed: Optional[int] = typer.Option(None, "--abort-min-executed",
                                                         help="Abort only after N nodes ended (default 1)"),
        abort_threshold: Optional[float] = typer.Option(None, "--abort-threshold",
                                                        help="Abort when this percent of ended nodes failed (0-100)"),
        retries: Optional[int] = typer.Option(None, "--retries", help="Runs again on a node whose run failed (0-10, "
                                                                      "default 0)"),
        timeout: Optional[str] = typer.Option(None, "--timeout", help="A node still queued after this times out "
                                                                      "(default 24h)"),
        in_progress_timeout: Optional[str] = typer.Option(None, "--in-progress-timeout", help="A run (or rollback) "
                                                          "still going after this is cancelled (default 10m)"),
        verify: Optional[str] = typer.Option(None, "--verify", help="How long a node must stay healthy after its "
                                                                    "run to count as succeeded (default 30s)"),
        rollback: Optional[str] = typer.Option(None, "--rollback", help="never, on-failure (default) or on-abort"),
        at: Optional[str] = typer.Option(None, "--at", help="Start at this time: ISO 8601 (UTC unless it says) or "
                                                            "+DURATION"),
        cron: Optional[str] = typer.Option(None, "--cron", help="Start a round at each fire of this crontab "
                                                                "expression (UTC)"),
        window: list[str] = typer.Option([], "--window", help="Maintenance window \"LABEL=VALUE CRON DURATION\": "
                                         "nodes with the label start only inside it; repeatable"),
        force: bool = typer.Option(False, "--force", help="Deploy even if `fleetflow validate` rejects the workflow"),
        as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt, hub: Optional[str] = HubOpt,
        token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
        data: Optional[Path] = DataOpt) -> None:
    """Deploy a versioned workflow to the nodes a target selects, node by node; prints the deployment's id."""
    fmt = output_format(output, as_json)
    body: dict[str, Any] = {
        "target": target, "inputs": _parse_inputs(input_), "rate": rate, "base_rate": base_rate,
        "increment_factor": increment_factor, "grow_after_notified": grow_after_notified,
        "grow_after_succeeded": grow_after_succeeded, "max_concurrent": max_concurrent, "waves": waves,
        "wave_success": wave_success, "pause_between": pause_between, "abort_type": abort_type,
        "abort_min_executed": abort_min_executed, "abort_threshold": abort_threshold, "retries": retries,
        "timeout": timeout, "in_progress_timeout": in_progress_timeout, "verify": verify, "rollback": rollback,
        "at": at, "cron": cron, "window": window}
    body = {key: value for key, value in body.items() if value not in (None, [], {})}
    _check(workflow, force)
    body["workflow"] = workflow.read_text()
    _refuse_locally(body)
    created = Client(hub, token_file, data).call("POST", "/deployments", json=body)
    if fmt in ("json", "yaml"):
        emit({"id": created["id"]}, fmt, lambda d, wide: str(d))
    else:
        typer.echo(created["id"])


def _refuse_locally(body: dict[str, Any]) -> None:
    """The hub's own checks, but for the fleet's label keys (the hub knows those): a flag it would refuse is a usage
    error here, before anything is sent."""
    from .deployments.model import DeploymentError, parse_request
    from .workflow import WorkflowError

    try:
        parse_request(body, None, now_ms())
    except DeploymentError as exc:
        fail(str(exc), 2)
    except WorkflowError as exc:
        fail(str(exc), 1)


# -- list and show -------------------------------------------------------------------------------------------------

@deployments_app.command("list")
def deployments_list(state: Optional[str] = typer.Option(None, help="Only deployments in this state"),
                     as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt, watch_: bool = WatchOpt,
                     watch_timeout: Optional[float] = WatchTimeoutOpt, hub: Optional[str] = HubOpt,
                     token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
                     data: Optional[Path] = DataOpt) -> None:
    """List deployments, newest first."""
    show_or_watch(Client(hub, token_file, data), "/deployments", output_format(output, as_json), _list_text, watch_,
                  watch_timeout, params={"state": state} if state else {})


def _list_text(deployments: list[dict[str, Any]], wide: bool) -> str:
    now = now_ms()
    columns = ["id", "component", "version", "state", "succeeded", "target", "age", "reason"]
    if wide:
        columns[6:6] = ["actor", "created", "next fire"]
    rows = []
    for dep in deployments:
        counts = dep["counts"]
        row = [dep["id"], dep["component"], dep["version"], dep["state"],
               f"{counts.get('succeeded', 0)}/{dep['nodes']}", " ".join(dep["target"]),
               duration(now - dep["created_at"]), dep["abort_reason"] or dep["reason"]]
        if wide:
            row[6:6] = [dep["actor"], iso(dep["created_at"]), iso(dep["next_fire"])]
        rows.append(row)
    return table(columns, rows)


@deployments_app.command("show")
def deployments_show(dep_id: str, as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt,
                     watch_: bool = WatchOpt, watch_timeout: Optional[float] = WatchTimeoutOpt,
                     hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                     token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Show a deployment: counts by state, a progress bar per wave, why it aborted, and each node's state, version
    and time. With --watch it ends by itself once the deployment and every execution have ended."""
    show_or_watch(Client(hub, token_file, data), f"/deployments/{dep_id}", output_format(output, as_json),
                  _show_text, watch_, watch_timeout, done=finished)


def finished(dep: dict[str, Any]) -> bool:
    return dep["state"] in ENDED and not any(dep["counts"].get(state) for state in LIVE)


def _setting(value: Any) -> str:
    """A journaled setting as a person reads it: lists joined, "600000ms" as a duration (--at as a time)."""
    if isinstance(value, list):
        return " ".join(f'"{v}"' for v in value) if any(" " in str(v) for v in value) else ",".join(map(str, value))
    text = str(value)
    if text.endswith("ms") and text[:-2].isdigit():
        ms = int(text[:-2])
        return iso(ms) if ms > 10**11 else duration(ms)  # an epoch time (--at), else a duration
    return f"{value:g}" if isinstance(value, float) else text


def _bar(done: int, total: int) -> str:
    filled = round(BAR * done / total) if total else BAR
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def _show_text(dep: dict[str, Any], wide: bool) -> str:
    now = now_ms()
    settings = {k: v for k, v in dep["settings"].items() if v not in (None, [], False)}
    lines = [f"deployment {dep['id']}  {dep['component']} {dep['version']}  {dep['state']}",
             f"  reason:   {dep['reason']}",
             f"  target:   {' '.join(dep['target'])}",
             f"  created:  {when(dep['created_at'], now)} by {dep['actor']}"]
    if dep["next_fire"] is not None:
        lines.append(f"  next:     {when(dep['next_fire'], now)}")
    if dep["abort_reason"]:
        lines.append(f"  aborted:  {dep['abort_reason']}")
    if dep.get("archived"):
        lines.append("  (archived: only its summary is kept; the hub's journal has the rest)")
    lines.append("  counts:   " + (", ".join(f"{state} {n}" for state, n in dep["counts"].items()) or "no nodes yet"))
    lines.append("  settings: " + ", ".join(f"{k.replace('_', '-')} {_setting(v)}" for k, v in settings.items()))
    if dep["waves"] and (len(dep["waves"]) > 1 or wide):
        lines += ["", f"waves (round {dep['round']}):"]
        labels = [f"{wave['wave']:>2} ({wave['size']})" for wave in dep["waves"]]
        for label, wave in zip(labels, dep["waves"]):
            lines.append(f"  {label:{max(map(len, labels))}}  {_bar(wave['done'], wave['nodes'])}  "
                         f"{wave['done']}/{wave['nodes']} ended, {wave['succeeded']} succeeded  {wave['status']}")
    if dep["executions"]:
        columns = ["node", "state", "version", "before", "wave", "updated", "reason"]
        if wide:
            columns[6:6] = ["started", "runs"]
        rows = []
        for ex in dep["executions"]:
            row = [ex["node"], ex["state"], ex["version"] or "-", ex["version_before"] or "-", ex["wave"],
                   ago(ex["updated_at"], now), ex["reason"]]
            if wide:
                row[6:6] = [iso(ex["started_at"]), ",".join(ex["runs"])]
            rows.append(row)
        lines += ["", table(columns, rows)]
    return "\n".join(lines)


# -- actions -------------------------------------------------------------------------------------------------------

def _control(action: str, dep_id: str, body: dict[str, Any], fmt: Format, hub: Optional[str],
             token_file: Optional[Path], data: Optional[Path]) -> None:
    """The deployment as the action left it: one line (table), or `show`'s text (wide), JSON or YAML."""
    dep = Client(hub, token_file, data).call("POST", f"/deployments/{dep_id}/{action}", json=body)
    if fmt == "table":
        typer.echo(f"{dep['id']} {dep['state']}: {dep['reason']}")
    else:
        emit(dep, fmt, _show_text)


def _pause_or_resume(action: str, doc: str) -> None:
    def command(dep_id: str, reason: str = typer.Option("", help="Why"), as_json: bool = JsonOpt,
                output: Optional[Format] = OutputOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
        _control(action, dep_id, {"reason": reason}, output_format(output, as_json), hub, token_file, data)

    command.__doc__ = doc
    deployments_app.command(action)(command)


_pause_or_resume("pause", "Pause a running deployment: no more nodes start; those under way go on.")
_pause_or_resume("resume", "Resume a paused deployment (after a wave under --pause-between, or a pause).")


@deployments_app.command("cancel")
def deployments_cancel(dep_id: str,
                       force: bool = typer.Option(False, "--force", help="End every execution now, whatever its "
                                                                         "state; runs under way are cancelled and "
                                                                         "their nodes told to stop"),
                       reason: str = typer.Option("", help="Why"), as_json: bool = JsonOpt,
                       output: Optional[Format] = OutputOpt, hub: Optional[str] = HubOpt,
                       token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
                       data: Optional[Path] = DataOpt) -> None:
    """Cancel a deployment: queued nodes are canceled; nodes under way finish, unless --force."""
    _control("cancel", dep_id, {"force": force, "reason": reason}, output_format(output, as_json), hub, token_file,
             data)
