"""A real `fleetflow hub run` process for system tests, and a small API client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hub.transitions import RUN_TERMINAL
from tests.agentprocess import AgentProcess
from tests.brokers import Broker


@dataclass
class HubProcess:
    broker: Broker
    fleet: str
    data: Path
    args: tuple[str, ...] = ("--auto-accept",)
    proc: subprocess.Popen[bytes] | None = None
    agents: list[AgentProcess] = field(default_factory=list)
    # The command that runs `fleetflow`; a test may run it through a launcher that injects a fault first.
    command: tuple[str, ...] = (str(Path(sys.executable).parent / "fleetflow"),)

    def start(self) -> HubProcess:
        self.data.mkdir(parents=True, exist_ok=True)
        with open(self.data.parent / "hub.log", "ab") as log:
            self.proc = subprocess.Popen([*self.command, "hub", "run", "--broker", self.broker.url, "--fleet", self.fleet,
                                          "--data", str(self.data), "--api", "127.0.0.1:0", "--log-level", "debug",
                                          *self.args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait(lambda: self._api_up(), 20, "the hub API")
        return self

    def _api_up(self) -> bool:
        try:
            return self.get("/health")["connected"] is True
        except (httpx.HTTPError, OSError, KeyError, ValueError):
            return False

    @property
    def url(self) -> str:
        raw = json.loads((self.data / "hub.json").read_text())
        return str(raw["_default"]["1"]["api"])

    @property
    def token(self) -> str:
        return (self.data / "api.token").read_text().strip()

    @property
    def public_key(self) -> str:
        return (self.data / "hub.key.pub").read_text().strip()

    def get(self, path: str) -> Any:
        response = httpx.get(self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response.text

    def post(self, path: str, body: Any = None, **headers: str) -> Any:
        response = httpx.post(self.url + path, json=body, timeout=30,
                              headers={"Authorization": f"Bearer {self.token}", **headers})
        response.raise_for_status()
        return response.json()

    def submit(self, workflow: str, inputs: dict[str, Any] | None = None) -> str:
        return str(self.post("/runs", {"workflow": workflow, "inputs": inputs or {}})["id"])

    def wait(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the hub exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + self.log()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)

    def wait_run(self, run_id: str, timeout: float = 30) -> dict[str, Any]:
        return self.wait(lambda: (r := self.get(f"/runs/{run_id}"))["state"] in RUN_TERMINAL and r, timeout,
                         f"run {run_id}")

    def agent(self, node_id: str, *args: str) -> AgentProcess:
        agent = AgentProcess(self.broker, self.fleet, node_id, self.data.parent / node_id / "data", self.public_key,
                             ("--heartbeat", "0.5", *args)).start()
        self.agents.append(agent)
        return agent

    def wait_nodes(self, n: int, timeout: float = 20) -> None:
        self.wait(lambda: sum(1 for x in self.get("/nodes") if x["liveness"] == "online") >= n, timeout,
                  f"{n} nodes online")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> HubProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        path = self.data.parent / "hub.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self.get("/metrics").splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total


