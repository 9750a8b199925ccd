"""`fleetflow artifacts add|list`: the hub's artifact store, through its API.

`add` streams the file to `POST /artifacts` (an operator token): the hub hashes it, stores it under its SHA-256 and
signs its manifest with the hub key, and the upload is audited like every operator action. Through the API rather
than the data directory, so a CI job or a laptop can add a build without the hub's key ever leaving the hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from ..client import (Client, DataOpt, Format, HubOpt, JsonOpt, OutputOpt, TokenFileOpt, TokenOpt, emit, fail, now_ms,
                      output_format, table, when)
from .store import ArtifactError, check_new

artifacts_app = typer.Typer(help="Add artifacts (content-addressed files with a manifest the hub signs) and list "
                                 "them.", no_args_is_help=True)


@artifacts_app.command("add")
def artifacts_add(path: Path = typer.Argument(..., help="The file to add"),
                  name: str = typer.Option(..., "--name", help="Artifact name: 1-64 of A-Z a-z 0-9 _ . -"),
                  version: str = typer.Option(..., "--version", help="Semantic version, MAJOR.MINOR.PATCH"),
                  url: Optional[str] = typer.Option(None, "--url", help="A mirror (http:// or https://) serving the "
                                                                         "same bytes; nodes try it before the hub"),
                  file: Optional[str] = typer.Option(None, "--file", help="The file name nodes install it as "
                                                                           "(default: the name of PATH)"),
                  as_json: bool = JsonOpt, hub: Optional[str] = HubOpt, token: Optional[str] = TokenOpt,
                  token_file: Optional[Path] = TokenFileOpt, data: Optional[Path] = DataOpt) -> None:
    """Add a file as NAME@VERSION (needs an operator token). A version never changes: adding it again with the same
    bytes prints what is stored, with other bytes it is refused."""
    if not path.is_file():
        fail(f"FILE {path}: {'not a regular file' if path.exists() else 'no such file'}", 2)
    try:
        check_new(name, version, file or path.name, url)
    except ArtifactError as exc:
        fail(str(exc), 2)
    client = Client(hub, token_file, data)
    size = os.stat(path).st_size
    with open(path, "rb") as body:
        params = {"name": name, "version": version, "file": file or path.name, **({"url": url} if url else {})}
        stored = client.call("POST", "/artifacts", params=params, content=body,
                             headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    if as_json:
        emit(stored, "json", lambda d, wide: "")
        return
    what = "added" if stored.pop("created") else "already stored with these bytes:"
    typer.echo(f"{what} {stored['ref']}: {stored['size']} bytes, sha256 {stored['sha256']}, signed by hub key "
               f"{stored['kid']}")


@artifacts_app.command("list")
def artifacts_list(as_json: bool = JsonOpt, output: Optional[Format] = OutputOpt, hub: Optional[str] = HubOpt,
                   token: Optional[str] = TokenOpt, token_file: Optional[Path] = TokenFileOpt,
                   data: Optional[Path] = DataOpt) -> None:
    """List the stored artifacts (JSON has each signed manifest in hex)."""
    emit(Client(hub, token_file, data).call("GET", "/artifacts"), output_format(output, as_json), _artifacts_text)


def _artifacts_text(items: list[dict[str, Any]], wide: bool) -> str:
    now = now_ms()
    columns = ["name", "version", "file", "size", "sha256", "added"] + (["url", "kid"] if wide else [])
    rows = [[a["name"], a["version"], a["file"], a["size"], a["sha256"] if wide else a["sha256"][:12],
             when(a["created"], now)] + ([a["url"] or "-", a["kid"]] if wide else []) for a in items]
    return table(columns, rows)
