"""A real `fleetflow agent run` process for integration and system tests: started, signalled, killed, its exit code
and log read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.brokers import Broker


@dataclass
class AgentProcess:
    """A real `fleetflow agent run` process."""

    broker: Broker
    fleet: str
    node_id: str
    data: Path
    hub_key: str | None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    # The command that runs `fleetflow`; a test may run it through a launcher that injects a fault first.
    command: tuple[str, ...] = (str(Path(sys.executable).parent / "fleetflow"),)

    def start(self) -> AgentProcess:
        cmd = [*self.command, "agent", "run", "--broker", self.broker.url, "--fleet", self.fleet, "--node-id", self.node_id,
               "--data", str(self.data), "--log-level", "debug", *self.args]
        if self.hub_key:
            cmd += ["--hub-key", self.hub_key]
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.data.parent / f"{self.node_id}.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """The exit code; AssertionError if the process still runs after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent {self.node_id} still running after {timeout} s") from None

    def public_key(self) -> bytes:
        """The node's public key, from the file the agent writes beside its key on first start."""
        return bytes.fromhex((self.data / "node.key.pub").read_text().strip())

    def log(self) -> str:
        path = self.data.parent / f"{self.node_id}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
