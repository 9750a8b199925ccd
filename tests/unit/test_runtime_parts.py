"""Parts of agent/runtime/ that both the agent and the hub use: durable private files, and an import that costs only
what a command uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.runtime.storage import write_private


def test_a_short_write_is_continued_so_a_good_file_is_replaced_only_by_all_of_the_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "identity.json"
    path.write_bytes(b"the good file")
    real = os.write
    calls: list[int] = []

    def short(fd: int, data: bytes) -> int:  # at most 3 bytes a call, as a write interrupted by a signal may take
        calls.append(len(data))
        return real(fd, bytes(data[:3]))

    monkeypatch.setattr(os, "write", short)
    new = b'{"boot": 12345, "key": "abcdef"}'
    write_private(path, new)
    assert path.read_bytes() == new and len(calls) == -(-len(new) // 3)


def test_a_write_that_makes_no_progress_fails_and_keeps_the_good_file(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "identity.json"
    path.write_bytes(b"the good file")
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="no progress"):
        write_private(path, b"new")
    assert path.read_bytes() == b"the good file"


def test_the_fleetflow_command_does_not_load_the_mqtt_client_until_a_command_needs_it() -> None:
    # A fresh interpreter: this one has long imported everything.
    probe = ("import sys, agent.cli, agent.runtime as r; loaded = sorted(m for m in ('aiomqtt', 'paho.mqtt.client') "
             "if m in sys.modules); r.MqttTransport; print(loaded, 'aiomqtt' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == ["[]", "True"], done.stdout + done.stderr  # and a name still loads on first use
