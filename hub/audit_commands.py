"""`fleetflow audit verify|show`: the hub's signed audit log (hub/audit.py), read from its data directory.

Read from the files, not through the API: the check must not depend on the process whose record it checks, and it
works as well on a stopped hub or on a copy of its data directory (hub.key, audit.log, audit.head). Who may read the
data directory (mode 0700) is who may run it.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any, Optional

import typer

from agent.runtime.console import fail

from .client import Format, JsonOpt, OutputOpt, emit, iso, output_format, table

audit_app = typer.Typer(help="Verify and show the hub's signed, hash-chained audit log.", no_args_is_help=True)
AuditDataOpt = typer.Option(..., "--data", envvar="FLEETFLOW_DATA",
                            help="The hub's data directory (or a copy of hub.key, audit.log and audit.head) "
                                 "[FLEETFLOW_DATA]")


@audit_app.command("verify")
def audit_verify(data: Path = AuditDataOpt,
                 as_json: bool = typer.Option(False, "--json", help="Print JSON: ok, entries, message")) -> None:
    """Check every entry's hash, signature and place in the chain, and the signed head: exit 0 with a summary, or 1
    naming the first entry changed, removed, reordered or badly signed."""
    from agent.runtime.keys import KeyFileError

    from .audit import verify

    if not data.is_dir():
        fail(f"{data} is not a directory (give the hub's data directory with --data)", 2)
    try:
        verdict = verify(data)
    except KeyFileError as exc:
        fail(f"{exc} (the audit is checked against the hub's keys in {data})", 2)
    except OSError as exc:
        fail(f"cannot read the audit log in {data}: {exc.strerror or exc}", 2)
    if as_json:
        typer.echo(json.dumps({"ok": verdict.ok, "entries": verdict.entries, "message": verdict.message}))
    elif verdict.ok:
        typer.echo(verdict.message)
    if not verdict.ok:
        fail(f"audit log {data / 'audit.log'}: {verdict.message}", 1)


@audit_app.command("show")
def audit_show(data: Path = AuditDataOpt,
               last: int = typer.Option(50, "--last", "-n", min=1, help="How many of the latest entries"),
               as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt) -> None:
    """The latest entries: when, who (token name and role), what, on what, from where, and the answer's status.
    Shows what is written; `audit verify` says whether it can be trusted."""
    from .audit import read_entries

    if not data.is_dir():
        fail(f"{data} is not a directory (give the hub's data directory with --data)", 2)
    try:
        entries = list(deque((e for _, e in read_entries(data) if isinstance(e, dict)), maxlen=last))
    except OSError as exc:
        fail(f"cannot read the audit log in {data}: {exc.strerror or exc}", 2)
    emit(entries, output_format(output, as_json), _entries_text)


def _entries_text(entries: list[dict[str, Any]], wide: bool) -> str:
    columns = ["seq", "at", "who", "role", "action", "target", "from", "status"] + (["params", "kid"] if wide else [])
    rows = []
    for e in entries:
        row = [e.get("seq"), iso(e.get("at")), e.get("who"), e.get("role"), e.get("action"), e.get("target") or "-",
               e.get("from"), e.get("status")]
        if wide:
            row += [json.dumps(e.get("params", {}), sort_keys=True), e.get("kid")]
        rows.append(row)
    return table(columns, rows)
