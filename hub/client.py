"""What every client command shares: finding the hub and its token, calling the API, options, output, errors.

Client commands find the hub from `--hub URL` and `--token-file`, from FLEETFLOW_HUB and FLEETFLOW_TOKEN (or
FLEETFLOW_TOKEN_FILE), or from `--data DIR` of a local hub; a secret is never taken from the command line. Exit codes:
0 done; 1 refused or failed (a bad workflow, a run that failed); 2 usage error; 3 the hub cannot be reached.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

import typer

from agent.runtime.console import fail

from .transitions import RUN_TERMINAL as TERMINAL  # noqa: F401 (run_commands reads it from here)

Format = Literal["table", "wide", "json", "yaml"]
WATCH_INTERVAL_S = 1.0
MIN_WRAPPED = 20  # on a narrow terminal, the widest column wraps only if it keeps this much room
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase screen: a watch redraws in place on a terminal


def refuse_secret_flag(flag: str, instead: str) -> Any:
    """A typer callback for a flag that used to take a secret: a command line is visible to every user (ps), so
    the flag is kept only to say where the secret goes now (exit 2)."""

    def check(value: Optional[str]) -> Optional[str]:
        if value is not None:
            fail(f"{flag} is not accepted on the command line (other users see it in ps); use {instead}", 2)
        return value

    return check


def _meta(data: Path) -> dict[str, Any]:
    try:
        raw = json.loads((data / "hub.json").read_text())
    except (OSError, ValueError):
        return {}
    return dict(raw.get("_default", {}).get("1", {}))


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
    from agent.runtime.settings import ConfigError, read_secret_file

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
JsonOpt = typer.Option(False, "--json", help="Print JSON (the same as -o json)")
OutputOpt = typer.Option(None, "--output", "-o", help="table (the default), wide (more), json or yaml; JSON and YAML "
                                                      "keep times as epoch milliseconds")
WatchOpt = typer.Option(False, "--watch", "-w", help="Print again whenever it changes, until Ctrl-C")
# Bounds a watch for scripts and tests; people end one with Ctrl-C.
WatchTimeoutOpt = typer.Option(None, "--watch-timeout", hidden=True, min=0)


def output_format(output: Optional[Format], as_json: bool) -> Format:
    """The format asked for: `-o`, else `--json` (kept as an alias of `-o json`), else a table."""
    if as_json and output not in (None, "json"):
        fail(f"--json and -o {output} disagree: give one of them", 2)
    return "json" if as_json else (output or "table")


def render(data: Any, fmt: Format, text: Callable[[Any, bool], str]) -> str:
    """`data` in the format asked for; `text(data, wide)` draws the table or readable text of the command."""
    if fmt == "json":
        return json.dumps(data)
    if fmt == "yaml":
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1 << 16)).rstrip("\n")
    return text(data, fmt == "wide")


def emit(data: Any, fmt: Format, text: Callable[[Any, bool], str]) -> None:
    typer.echo(render(data, fmt, text))


def _terminal() -> bool:
    return sys.stdout.isatty()


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns as kubectl prints them: a header line, then one line per item, no box drawing, every cell whole.

    Piped (to a file, grep, awk) that holds however long a row is: rich, which draws tables for terminals, would cut
    cells with an ellipsis when not writing to one (at 80 columns, or at any `Console(width=...)` it is given). On a
    terminal too narrow for the rows, the widest column (labels, errors) wraps within its width when the others fit
    beside it; when they do not, lines stay whole and the terminal folds them, as kubectl's do."""
    header = [c.upper() for c in columns]
    cells = [[_cell(v).replace("\n", "\\n") for v in row] for row in rows]  # one line per row, for grep and awk
    widths = [max([len(header[i]), *(len(row[i]) for row in cells)]) for i in range(len(header))]
    if _terminal():
        from rich.console import Console

        console = Console()
        widest = max(range(len(widths)), key=lambda i: widths[i])
        others = sum(widths) - widths[widest] + 2 * (len(widths) - 1)
        if others + widths[widest] > console.width and console.width - others >= MIN_WRAPPED:
            return _wrapped(console, header, cells, widths, widest)
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *cells])


def _wrapped(console: Any, header: list[str], cells: list[list[str]], widths: list[int], widest: int) -> str:
    from rich.table import Table

    drawn = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold")
    for i, column in enumerate(header):
        if i == widest:
            drawn.add_column(column, overflow="fold")
        else:
            drawn.add_column(column, no_wrap=True, min_width=widths[i])
    for row in cells:
        drawn.add_row(*row)
    with console.capture() as captured:
        console.print(drawn)
    return "\n".join(line.rstrip() for line in captured.get().splitlines())


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a table (the title is no longer shown: piped output keeps one header line, as kubectl's does)."""
    typer.echo(table(columns, rows))


# -- times: people read ages, programs read epoch milliseconds (JSON and YAML keep those) -------------------------

def now_ms() -> int:
    return int(time.time() * 1000)


def duration(ms: float) -> str:
    """A span a person reads at a glance: 40 ms, 0.2 s, 12 s, 5 min 3 s, 3 h 20 min, 2 d 4 h."""
    s = max(0.0, ms / 1000)
    if s < 0.1:
        return f"{round(s * 1000)} ms"
    if s < 10:
        return f"{f'{s:.1f}'.rstrip('0').rstrip('.')} s"
    if s < 60:
        return f"{round(s)} s"
    m, h, d = int(s // 60), int(s // 3600), int(s // 86400)
    if s < 600:
        return f"{m} min" + (f" {int(s % 60)} s" if int(s % 60) else "")
    if s < 3600:
        return f"{m} min"
    if s < 86400:
        return f"{h} h" + (f" {m % 60} min" if m % 60 else "")
    return f"{d} d" + (f" {h % 24} h" if h % 24 else "")


def ago(at: Optional[int], now: int) -> str:
    """"3 s ago" (or "in 5 min" for a time still to come); "-" for a time not set."""
    if at is None:
        return "-"
    return f"in {duration(at - now)}" if at - now > 1000 else f"{duration(now - at)} ago"


def iso(at: Optional[int]) -> str:
    if at is None:
        return "-"
    stamp = datetime.fromtimestamp(at / 1000, timezone.utc).isoformat(timespec="seconds")
    return stamp.replace("+00:00", "Z")


def when(at: Optional[int], now: int) -> str:
    """An instant for people: ISO time (UTC) and how long ago."""
    return "-" if at is None else f"{iso(at)} ({ago(at, now)})"


# -- watch ---------------------------------------------------------------------------------------------------------

def watch(fetch: Callable[[], Any], fmt: Format, text: Callable[[Any, bool], str], *, timeout: Optional[float] = None,
          done: Optional[Callable[[Any], bool]] = None, volatile: frozenset[str] = frozenset()) -> None:
    """Print what `fetch` returns, and again whenever it changes, until Ctrl-C (a normal end: exit 0), `done(data)`
    or `timeout` seconds.

    On a terminal a table is redrawn in place, so its ages stay current. Otherwise (piped, or JSON/YAML) each change
    is appended: JSON one document per line, YAML a stream of documents, text a blank line apart. Keys named in
    `volatile` (a heartbeat's time) are not a change worth appending, or a fleet would print at every heartbeat."""
    in_place = fmt in ("table", "wide") and _terminal()
    deadline = None if timeout is None else time.monotonic() + timeout
    shown: Optional[str] = None
    try:
        while True:
            data = fetch()
            key = render(data, fmt, text) if in_place else json.dumps(_without(data, volatile), sort_keys=True)
            if key != shown:
                if in_place:
                    typer.echo(_CLEAR + key)
                else:
                    if shown is not None and fmt != "json":
                        typer.echo("---" if fmt == "yaml" else "")
                    emit(data, fmt, text)
                shown = key
            if done is not None and done(data):
                return
            pause = WATCH_INTERVAL_S
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
                if pause <= 0:
                    return
            time.sleep(pause)
    except KeyboardInterrupt:
        return


def _without(data: Any, keys: frozenset[str]) -> Any:
    if isinstance(data, dict):
        return {k: _without(v, keys) for k, v in data.items() if k not in keys}
    if isinstance(data, list):
        return [_without(v, keys) for v in data]
    return data


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
