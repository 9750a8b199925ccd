"""Start-up errors are loud: an unreachable broker at the first connection and a data directory that cannot be
written end the agent and the hub with one line naming the setting (exit 1), no traceback, within a bound."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nacl.signing
import pytest

from tests.brokers import free_port
from tests.cli import fleetflow

HUB_KEY = bytes(nacl.signing.SigningKey(b"\x01" * 32).verify_key).hex()


def agent(broker: str, data: Path) -> subprocess.CompletedProcess[str]:
    return fleetflow("agent", "run", "--broker", broker, "--fleet", "f", "--node-id", "n1", "--data", data,
                     "--hub-key", HUB_KEY)


def hub(broker: str, data: Path) -> subprocess.CompletedProcess[str]:
    return fleetflow("hub", "run", "--broker", broker, "--fleet", "f", "--data", data, "--api", "127.0.0.1:0")


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.rstrip("\n").rsplit("\n", 1)[-1]


@pytest.mark.parametrize("start", [agent, hub], ids=["agent", "hub"])
def test_an_unreachable_broker_at_start_exits_naming_it(start: object, tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    done = start(url, tmp_path / "data")  # type: ignore[operator]
    assert done.returncode == 1, done.stderr
    assert last_line(done) == f"error: cannot reach the broker at {url} (--broker): connection refused"


@pytest.mark.parametrize("start", [agent, hub], ids=["agent", "hub"])
def test_a_data_directory_that_cannot_be_written_exits_naming_it(start: object, tmp_path: Path) -> None:
    # Fails for root too: a directory cannot be made inside a regular file.
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    done = start(f"mqtt://127.0.0.1:{free_port()}", afile / "data")  # type: ignore[operator]
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"error: data directory {afile / 'data'} (--data) is not writable: not a directory\n"
    assert afile.read_text() == "not a directory\n"
