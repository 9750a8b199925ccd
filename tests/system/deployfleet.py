"""A fleet for deployment tests and bench/deploy.py: a real hub process on a real Mosquitto, simulated devices (the
workers of sim/orchestra.py, each device the real `Agent` with its own MQTT connection) driven from synchronous
code, and what a test judges by: the CLI's and the API's JSON, and the hub's journal file.

Devices get their labels and behaviour from firmware profiles written for the test (`PROFILES`, found through
FLEETFLOW_PROFILES by the hub, the workers and the CLI): every one carries `role=gateway`; `dtest-bad` fails every
`update` step, `dtest-slow` runs steps 150 times slower, `dtest-late` also carries `ring=late`.

    with DeployFleet(tmp_path) as fleet:
        fleet.add_devices({"d-00": "dtest", "d-01": "dtest-bad"})
        dep = fleet.deploy(WORKFLOW, "--target", "role=gateway", "--rate", "120/min")
        done = fleet.wait_deployment(dep, {"succeeded", "aborted"})
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self, TypeVar

from hub.deployments.machine import DEPLOYMENT_OPEN, EXECUTION_TERMINAL
from hub.journal_commands import JOURNAL_FILE, export_lines
from sim.orchestra import STOP_S, Orchestra
from tests.brokers import Broker
from tests.cli import ok
from tests.hubprocess import HubProcess

T = TypeVar("T")
BOUND_S = 90.0  # what a system condition gets on a busy machine
TERMINAL = frozenset(str(s) for s in EXECUTION_TERMINAL)
OPEN = frozenset(str(s) for s in DEPLOYMENT_OPEN)

_PROFILE = """name = "{name}"
description = "a gateway as the deployment tests play it"
capabilities = ["net"]
max_concurrent = 2

[labels]
role = "gateway"
{labels}
[resources]
cores = 2
memory_mb = 1024
disk_gb = 8

[intervals]
heartbeat_s = 2
telemetry_s = 2

[thresholds]
cpu = {{ high = 97, critical = 99 }}
temp = {{ high = 90, critical = 95 }}

[sim]
baseline_cpu = 5
noise = 1
step_speed = {speed}
failure_rate = {failure}
boot_time_s = 0
ambient_c = 30
heat_per_cpu = 0.1
cooling = 0.5
"""
PROFILES = {"dtest": _PROFILE.format(name="dtest", labels="", speed=1, failure=0),
            "dtest-bad": _PROFILE.format(name="dtest-bad", labels="", speed=1, failure=1),
            "dtest-slow": _PROFILE.format(name="dtest-slow", labels="", speed=150, failure=0),
            "dtest-late": _PROFILE.format(name="dtest-late", labels='ring = "late"\n', speed=1, failure=0)}


class SimDevices:
    """Simulated devices in worker processes (sim/orchestra.py), steered from synchronous code through an event
    loop of their own in a thread. Each `add` starts one more set of workers, so devices can join at any time."""

    def __init__(self, broker: str, fleet: str, hub_key: str, root: Path, heartbeat: float, telemetry: float,
                 procs: int = 1) -> None:
        self.broker, self.fleet, self.hub_key, self.root = broker, fleet, hub_key, root
        self.heartbeat, self.telemetry, self.procs = heartbeat, telemetry, procs
        self.orchestras: list[Orchestra] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-devices", daemon=True)
        self.thread.start()

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def add(self, devices: Mapping[str, str]) -> None:
        """Start devices: node id -> profile name."""
        root = self.root / f"set-{len(self.orchestras)}"
        root.mkdir(parents=True)
        orchestra = Orchestra(self.broker, self.fleet, self.hub_key, root,
                              [{"node_id": n, "profile": p} for n, p in devices.items()], procs=self.procs,
                              heartbeat=self.heartbeat, telemetry=self.telemetry)
        self._call(orchestra.start())
        self.orchestras.append(orchestra)

    def _owner(self, node: str) -> Orchestra:
        return next(o for o in self.orchestras if any(node in w.nodes for w in o.workers))

    def kill(self, node: str) -> None:
        """Power cut: no DISCONNECT, the broker publishes its Will; it stays off."""
        self._call(self._owner(node).kill([node]))

    def flap(self, node: str, down_s: float) -> None:
        """Power cut, then the device boots again (a new boot) after `down_s` seconds."""
        self._call(self._owner(node).fault(node, {"cmd": "flap", "times": 1, "every": down_s}))

    @property
    def busy(self) -> set[str]:
        """Devices running steps, as they said in their last stats line (once a second)."""
        return set().union(*(o.busy for o in self.orchestras)) if self.orchestras else set()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for o in self.orchestras for w in o.workers]

    def stop(self) -> None:
        try:
            for orchestra in self.orchestras:
                self._call(orchestra.stop(), timeout=STOP_S + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class DeployFleet:
    """Mosquitto, a hub process (auto-accepting) and simulated devices, stopped in reverse order on exit."""

    def __init__(self, root: Path, fleet: str = "deploy", heartbeat: float = 2.0, telemetry: float = 2.0,
                 procs: int = 1, hub_args: tuple[str, ...] = ("--log-level", "info")) -> None:
        self.root = root
        self.fleet_id = fleet
        self.profiles = root / "profiles"
        self.heartbeat, self.telemetry, self.procs, self.hub_args = heartbeat, telemetry, procs, hub_args
        self._stack = ExitStack()
        self._saved_env: str | None = None
        self.broker: Broker
        self.hub: HubProcess
        self.devices: SimDevices

    def __enter__(self) -> Self:
        self.profiles.mkdir(parents=True, exist_ok=True)
        for name, text in PROFILES.items():
            (self.profiles / f"{name}.toml").write_text(text)
        # The hub (health thresholds, label keys) and the workers read the profiles by name from the search path.
        self._saved_env = os.environ.get("FLEETFLOW_PROFILES")
        os.environ["FLEETFLOW_PROFILES"] = str(self.profiles)
        self._stack.callback(self._restore_env)
        try:
            self.broker = Broker("mosquitto", self.root / "broker").start()
            self._stack.callback(self.broker.stop)
            self.hub = HubProcess(self.broker, self.fleet_id, self.root / "hub", args=("--auto-accept", *self.hub_args))
            self._stack.callback(self.hub.stop)
            self.hub.start()
            self.devices = SimDevices(self.broker.url, self.fleet_id, self.hub.public_key, self.root / "devices",
                                      self.heartbeat, self.telemetry, self.procs)
            self._stack.callback(self.devices.stop)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _restore_env(self) -> None:
        if self._saved_env is None:
            os.environ.pop("FLEETFLOW_PROFILES", None)
        else:
            os.environ["FLEETFLOW_PROFILES"] = self._saved_env

    # -- devices -----------------------------------------------------------------------------------------------------

    def add_devices(self, devices: Mapping[str, str], wait: bool = True) -> None:
        """Start devices (node id -> profile); with `wait`, until the hub holds each of them online."""
        self.devices.add(devices)
        if wait:
            self.wait_online(devices)

    def wait_online(self, nodes: Iterable[str]) -> None:
        wanted = set(nodes)
        self.hub.wait(lambda: wanted <= {n["id"] for n in self.hub.get("/nodes") if n["liveness"] == "online"},
                      BOUND_S + len(wanted) / 5, f"{len(wanted)} devices online")

    # -- the CLI, as a user types it -----------------------------------------------------------------------------

    def cli(self, *args: str | Path) -> str:
        return ok(*args, "--data", self.hub.data, env={"FLEETFLOW_PROFILES": str(self.profiles)})

    def cli_json(self, *args: str | Path) -> Any:
        return json.loads(self.cli(*args, "--json"))

    def deploy(self, workflow: str, *flags: str) -> str:
        """`fleetflow deploy WF.yaml FLAGS --json`; the deployment's id. A workflow using the simulator's `update`
        step goes with --force: `fleetflow validate` on this machine knows no device that offers it (the hub checks
        it against the devices' capabilities)."""
        path = self.root / f"wf-{len(list(self.root.glob('wf-*.yaml')))}.yaml"
        path.write_text(workflow)
        force = ("--force",) if "uses: update" in workflow else ()
        return str(self.cli_json("deploy", path, *flags, *force)["id"])

    def show(self, deployment: str) -> dict[str, Any]:
        """`fleetflow deployments show ID --json`."""
        return dict(self.cli_json("deployments", "show", deployment))

    # -- the API, for waits (cheaper than a process per look) --------------------------------------------------------

    def view(self, deployment: str) -> dict[str, Any]:
        return dict(self.hub.get(f"/deployments/{deployment}"))

    def executions(self, deployment: str) -> dict[str, dict[str, Any]]:
        return {ex["node"]: ex for ex in self.view(deployment)["executions"]}

    def wait_deployment(self, deployment: str, states: Iterable[str], timeout: float = BOUND_S) -> dict[str, Any]:
        wanted = set(states)
        return self.hub.wait(lambda: (v := self.view(deployment))["state"] in wanted and v, timeout,
                             f"deployment {deployment} to be {' or '.join(sorted(wanted))}")

    def wait_settled(self, deployment: str, timeout: float = BOUND_S) -> dict[str, Any]:
        """The deployment ended and every execution is terminal (a rollback after an abort may still run when the
        deployment's own state already ended)."""
        return self.hub.wait(lambda: ((v := self.view(deployment))["state"] not in OPEN
                                      and all(ex["state"] in TERMINAL for ex in v["executions"]) and v),
                             timeout, f"deployment {deployment} and all its executions to end")

    def wait_states(self, deployment: str, wanted: Mapping[str, str], timeout: float = BOUND_S) -> dict[str, Any]:
        """Until each named node's execution is in the given state; the executions then."""
        def reached() -> dict[str, dict[str, Any]] | None:
            now = self.executions(deployment)
            return now if all(now.get(n, {}).get("state") == s for n, s in wanted.items()) else None
        return self.hub.wait(reached, timeout, f"executions of {deployment} to reach {dict(wanted)}")

    def wait_started(self, deployment: str, node: str, timeout: float = BOUND_S) -> dict[str, Any]:
        """Until the node's execution has started (whatever state it is in by now); the execution then."""
        return self.hub.wait(lambda: (ex := self.executions(deployment).get(node, {})).get("started_at") and ex,
                             timeout, f"{node}'s execution of {deployment} to start")

    def node_versions(self) -> dict[str, dict[str, str]]:
        """Each node's inventory (component -> version) as the hub's node listing gives it."""
        return {n["id"]: dict(n.get("versions") or {}) for n in self.hub.get("/nodes")}

    # -- the journal, read from its file -----------------------------------------------------------------------------

    def journal(self, kinds: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
        wanted = None if kinds is None else set(kinds)
        for line in export_lines(self.hub.data / JOURNAL_FILE):
            event = json.loads(line)
            if wanted is None or event["kind"] in wanted:
                yield event

    def execution_events(self, deployment: str) -> list[dict[str, Any]]:
        return [e for e in self.journal({"execution_changed"}) if e["deployment"] == deployment]

    def deployment_events(self, deployment: str) -> list[dict[str, Any]]:
        return [e for e in self.journal({"deployment_changed"}) if e["deployment"] == deployment]

    def starts(self, deployment: str) -> list[tuple[int, str]]:
        """(journal time, node) of each execution's start (queued -> in_progress), in journal order."""
        state: dict[str, str] = {}
        out = []
        for event in self.execution_events(deployment):
            if event["state"] == "in_progress" and state.get(event["node"]) == "queued":
                out.append((int(event["at"]), event["node"]))
            state[event["node"]] = event["state"]
        return out


def workflow(name: str, version: str, steps: str, migrates_from: str | None = None) -> str:
    """A deployable workflow's YAML: `steps` is the YAML of its step list, indented by two spaces."""
    migration = f"migrates_from: [\"{migrates_from}\"]\n" if migrates_from else ""
    return f"name: {name}\nversion: {version}\n{migration}steps:\n{steps}"


def update_step(seconds: float = 0.2, attempts: int = 1, undo: str = "{uses: echo, with: {undo: install}}",
                step: str = "install", needs: str = "") -> str:
    """The simulator's `update` step (dtest-bad devices fail it), compensated by `undo`."""
    after = f"    needs: [{needs}]\n" if needs else ""
    return (f"  - id: {step}\n    uses: update\n    with: {{seconds: {seconds}}}\n{after}"
            f"    retry: {{max_attempts: {attempts}, initial: 30}}\n    compensate: {undo}\n")
