"""Start-up checks (agent/runtime/startup.py) and the root command's handling of missing extras (agent/extras.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agent.extras import OPTIONAL_COMMANDS, PACKAGES, REGISTRARS, RootGroup, needs_extra_message
from agent.runtime.startup import LOCK_FILE, DataLock, StartupError, broker_unreachable
from agent.runtime.transport import TransportError


def test_one_lock_per_data_directory_naming_the_holder(tmp_path: Path) -> None:
    data = tmp_path / "node"
    held = DataLock.acquire(data)
    assert (data / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(StartupError) as refused:
        DataLock.acquire(data)
    assert str(refused.value) == (f"data directory {data} (--data) is in use by another fleetflow process (pid "
                                  f"{os.getpid()}); stop it, or give each agent or hub its own --data directory")
    assert (data / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the refused start wrote nothing
    held.release()
    DataLock.acquire(data).release()


def test_deleting_the_lock_file_does_not_let_a_second_process_in(tmp_path: Path) -> None:
    held = DataLock.acquire(tmp_path)
    try:
        (tmp_path / LOCK_FILE).unlink()  # an operator tidying up while the holder runs
        with pytest.raises(StartupError, match="in use"):
            DataLock.acquire(tmp_path)
    finally:
        held.release()
    DataLock.acquire(tmp_path).release()


def test_a_lock_dies_with_its_process(tmp_path: Path) -> None:
    # The holder keeps the lock until it is killed: it blocks reading its stdin, which nobody writes.
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from agent.runtime.startup import DataLock; "
                               f"lock = DataLock.acquire({str(tmp_path)!r}); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StartupError, match=f"pid {holder.pid}"):
            DataLock.acquire(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait(10)
    DataLock.acquire(tmp_path).release()


def test_a_data_directory_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StartupError) as inside:
        DataLock.acquire(afile / "data", "--data")
    assert str(inside.value) == f"data directory {afile / 'data'} (--data) is not writable: not a directory"
    with pytest.raises(StartupError, match="is not a directory"):
        DataLock.acquire(afile)
    assert afile.read_text() == "x"


def test_the_first_connection_error_names_the_setting() -> None:
    error = TransportError("cannot connect to 127.0.0.1:1: [Errno 111] Connection refused")
    error.__cause__ = OSError("[Errno 111] Connection refused")
    assert str(broker_unreachable("mqtt://127.0.0.1:1", error)) == \
        "cannot reach the broker at mqtt://127.0.0.1:1 (--broker): connection refused"


def test_the_optional_command_table_matches_what_the_packages_register() -> None:
    for package in PACKAGES:
        holder = typer.Typer()
        REGISTRARS[package](holder)
        registered = set(typer.main.get_group(holder).commands)
        assert registered == {name for name, (owner, _) in OPTIONAL_COMMANDS.items() if owner == package}


def test_a_missing_extra_is_named_and_the_command_still_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    def without_hub(app: typer.Typer) -> None:  # what importing hub.commands does where PyYAML is missing
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    monkeypatch.setitem(REGISTRARS, "hub", without_hub)
    app = typer.Typer(cls=RootGroup)
    app.callback()(lambda: None)  # a group, as the root command is
    result = CliRunner().invoke(app, ["hub", "run", "--broker", "x"])
    assert result.exit_code == 2
    assert needs_extra_message("hub", "hub") == "the hub commands need the hub extra: pip install 'fleetflow[hub]'"
    assert "the hub commands need the hub extra" in result.output
    listed = CliRunner().invoke(app, ["--help"])
    assert "nodes" in listed.output and "not installed" in listed.output
