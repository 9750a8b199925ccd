"""The `fleetflow` command. The agent package holds the root command because every device has the agent installed;
hub and simulator commands are imported only when used (agent/extras.py), and name their extra where it is missing.

Exit codes: 0 done, 1 the command ran and the answer is "no" (a message failed verification, a check failed),
2 usage error (bad arguments, unreadable files). Errors are one line on stderr; FLEETFLOW_DEBUG=1 adds tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from . import __version__
from .extras import RootGroup, missing_extra, needs_extra_message
from .runtime.console import fail
from .runtime.keys import KeyFileError, describe, is_readable_file, parse_public_key, write_new_key


def _flags_render_as_flags() -> None:
    """Typer's rich help prints a value type after every boolean flag (`--json <bool>`, `--help <bool>`), as if it
    took a value; its plain help already leaves it out (typer 0.29). Leave it out there too: a flag shows no type."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "flags_fixed", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> Optional[str]:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich.flags_fixed = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_render_as_flags()
# Completion: `fleetflow --install-completion` (bash, zsh, fish, PowerShell, detected from the running shell) or
# `fleetflow --show-completion` to see the script; it calls back `fleetflow` with _FLEETFLOW_COMPLETE set.
app = typer.Typer(help="fleetflow: an edge/IoT agent mesh over MQTT.", no_args_is_help=True, add_completion=True,
                  pretty_exceptions_enable=False, cls=RootGroup)
keys_app = typer.Typer(help="Make and show Ed25519 keys.", no_args_is_help=True)
protocol_app = typer.Typer(help="Look inside wire messages.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(protocol_app, name="protocol")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fleetflow {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """fleetflow: an edge/IoT agent mesh over MQTT."""


@keys_app.command("new")
def keys_new(path: Path = typer.Argument(..., help="Private key file to write (mode 0600); PATH.pub gets the public key."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON: {kid, public_key}."),
             force: bool = typer.Option(False, "--force", help="Replace an existing key file.")) -> None:
    """Make a new Ed25519 key pair."""
    try:
        key = write_new_key(path, force)
    except KeyFileError as exc:
        fail(str(exc), 2)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}", 2)
    info = describe(bytes(key.verify_key))
    if as_json:
        typer.echo(json.dumps(info))
    else:
        typer.echo(f"private key: {path} (mode 0600)\npublic key:  {path}.pub\nkid:         {info['kid']}\n"
                   f"public_key:  {info['public_key']}")


def _read_envelope(value: str) -> bytes:
    if is_readable_file(value):
        data = Path(value).read_bytes()
        text = data.strip()
        try:  # a file may hold the hex form too
            return bytes.fromhex(text.decode()) if text and all(c in b"0123456789abcdefABCDEF" for c in text) else data
        except (UnicodeDecodeError, ValueError):
            return data
    try:
        return bytes.fromhex(value.strip())
    except ValueError:
        fail(f"ENVELOPE {value[:60]!r} is neither a readable file nor hex", 2)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@protocol_app.command("inspect")
def protocol_inspect(
        envelope_arg: str = typer.Argument(..., metavar="ENVELOPE", help="A file (raw or hex) or a hex string."),
        topic: str = typer.Option(..., "--topic", help="The topic the message was received on."),
        public_key: Optional[str] = typer.Option(None, "--public-key", help="Sender's key: hex or a file of hex."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show an envelope's header and payload; with --public-key, verify it (exit 1 with the reason if it fails)."""
    from protocols import ProtocolError, cbor, envelope, open_envelope

    data = _read_envelope(envelope_arg)
    key = None
    if public_key is not None:
        try:
            key = parse_public_key(public_key)
        except KeyFileError as exc:
            fail(str(exc), 2)
    result: dict[str, Any] = {"topic": topic, "size": len(data)}
    try:
        parsed = envelope.parse(data)
        result["kid"] = parsed.kid.hex()
        result["alg"] = "EdDSA"
        if key is None:
            result["verified"] = None
            result["payload"] = _jsonable(cbor.loads(parsed.payload))
        else:
            open_envelope(data, topic, key)
            result["verified"] = True
            result["payload"] = _jsonable(cbor.loads(parsed.payload))
    except ProtocolError as exc:
        result.update(verified=False, reason=exc.reason, error=str(exc))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        for name in ("topic", "size", "kid", "alg"):
            if name in result:
                typer.echo(f"{name:9s}{result[name]}")
        if "payload" in result:
            typer.echo("payload:")
            for name, value in result["payload"].items():
                typer.echo(f"  {name}: {json.dumps(value)}")
        verdict = {None: "not checked (no --public-key)", True: "verified"}.get(result["verified"], "REFUSED")
        typer.echo(f"signature: {verdict}")
        if result.get("verified") is False:
            typer.echo(f"error: {result['reason']}: {result['error']}", err=True)
    if result["verified"] is False:
        raise typer.Exit(1)


def _register_agent_commands() -> None:
    """`fleetflow agent ...`; the hub's and simulator's commands load on first use (RootGroup)."""
    from .commands import register

    register(app)


def main(argv: Optional[list[str]] = None) -> None:
    try:
        _register_agent_commands()
        app(args=argv, prog_name="fleetflow", standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug must still read as one line; the traceback is there on request
        if os.environ.get("FLEETFLOW_DEBUG"):
            raise
        extra = missing_extra(exc) if isinstance(exc, ModuleNotFoundError) else None
        if extra is not None:  # a command imports its extra's libraries only when it runs
            words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
            typer.echo(f"error: {needs_extra_message(words[0] if words else 'fleetflow', extra)}", err=True)
            sys.exit(2)
        typer.echo(f"error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
