"""What every client command shares: finding the hub and its token, calling the API, options, output, errors.

Client commands find the hub from `--hub URL` and `--token-file`, from FLEETFLOW_HUB and FLEETFLOW_TOKEN (or
FLEETFLOW_TOKEN_FILE), or from `--data DIR` of a local hub; a secret is never taken from the command line. Exit codes:
0 done; 1 refused or failed (a bad workflow, a run that failed); 2 usage error; 3 the hub cannot be reached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

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
