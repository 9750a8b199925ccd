"""`fleetflow journal export`: the hub's journal as JSON lines, read from its file (hub/journal.py), never through the
API, so what a checker reads (sim/history.py) does not depend on the process whose record it checks.

The file is opened read-only: it works on a stopped hub, on a copy of its data directory, and while the hub runs (a
WAL reader sees the last committed transaction and never blocks the writer). One line per event, in journal order:
`{"seq", "at", "kind", ...the event's fields}`; then one line per sender's replay mark (what the hub last accepted
from it): `{"kind": "replay_mark", "sender", "boot", "top", "death_seen"}`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import cbor2
import typer

from agent.runtime.console import fail

JOURNAL_FILE = "journal.sqlite"  # in the hub's data directory (hub/service.py)
MARK_KIND = "replay_mark"

journal_app = typer.Typer(help="Read the hub's event journal from its data directory.", no_args_is_help=True)


def open_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write. A journal on a read-only medium (a copy) is opened immutable: nothing else
    writes it there."""
    if not path.is_file():
        raise FileNotFoundError(f"no journal at {path}")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)
    return db


def _plain(value: Any) -> Any:
    """JSON for what CBOR may hold and JSON may not (bytes in a step's output)."""
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON")


def export_lines(path: Path) -> Iterator[str]:
    """The export, line by line, from one read transaction (events and marks agree)."""
    db = open_read_only(path)
    try:
        db.execute("BEGIN")  # one snapshot for both tables
        for seq, at, kind, data in db.execute("SELECT seq, at, kind, data FROM events ORDER BY seq"):
            yield json.dumps({"seq": seq, "at": at, "kind": kind, **cbor2.loads(data)}, default=_plain)
        for sender, boot, top, death in db.execute("SELECT sender, boot, top, death_seen FROM marks ORDER BY sender"):
            yield json.dumps({"kind": MARK_KIND, "sender": sender, "boot": boot, "top": top,
                              "death_seen": bool(death)})
    finally:
        db.close()


def export(path: Path, out: TextIO) -> int:
    """Write the export of the journal file `path` to `out`; the number of lines."""
    count = 0
    for line in export_lines(path):
        out.write(line + "\n")
        count += 1
    return count


@journal_app.command("export")
def journal_export(data: Path = typer.Option(..., "--data", envvar="FLEETFLOW_DATA",
                                             help="The hub's data directory (or a copy of its journal.sqlite) "
                                                  "[FLEETFLOW_DATA]"),
                   out: Path | None = typer.Option(None, "--out", help="Write here instead of stdout")) -> None:
    """Every journaled event as a JSON line ({seq, at, kind, fields}), then every sender's replay mark. Reads the
    file read-only: safe while the hub runs."""
    path = data / JOURNAL_FILE if data.is_dir() else data
    if not path.is_file():
        fail(f"no journal at {path} (give the hub's data directory with --data)", 2)
    try:
        if out is None:
            try:
                export(path, sys.stdout)
                sys.stdout.flush()
            except BrokenPipeError:  # a reader that stopped early (`| head`): nothing is wrong
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        with out.open("w") as target:
            count = export(path, target)
        typer.echo(f"{count} lines written to {out}", err=True)
    except (sqlite3.Error, cbor2.CBORDecodeError) as exc:
        fail(f"cannot read the journal {path}: {exc}", 1)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}", 1)
