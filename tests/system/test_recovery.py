"""Ordinary faults must not break the promise that every run finishes: a busy agent restarts, a stalled node comes
back without reconnecting, a broker outage that the hub rides out later than its nodes strands nothing, and a
connection that takes over a node's old client id does not fail it. Real hub and agent processes, real Mosquitto,
real signals."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.wire import Observer, Publisher

pytestmark = pytest.mark.slow

LONG = """
name: long
version: 1.0.0
steps:
  - id: long
    uses: sleep
    with: {seconds: 4}
    migratable: true
  - id: after
    needs: [long]
    uses: echo
"""

TWO_STEPS = """
name: two
version: 1.0.0
steps:
  - id: a
    uses: sleep
    with: {seconds: 1}
  - id: b
    needs: [a]
    uses: sleep
    with: {seconds: 1}
"""


@pytest.fixture
def hub(mosquitto: Broker, tmp_path: Path) -> Iterator[HubProcess]:
    with HubProcess(mosquitto, "rec", tmp_path / "hub") as process:
        yield process


def liveness(hub: HubProcess, node: str) -> str:
    return str(hub.get(f"/nodes/{node}")["liveness"])


def hub_window_top(agent_data: Path) -> int:
    """Read the agent's saved replay window of hub commands straight from its outbox (plain CBOR: any form)."""
    db = sqlite3.connect(agent_data / "outbox.sqlite")
    try:
        row = db.execute("SELECT value FROM state WHERE name = 'hub_window'").fetchone()
    finally:
        db.close()
    return int(cbor2.loads(row[0])["top"]) if row else 0


def test_busy_agent_restarts_after_100_hub_commands(hub: HubProcess) -> None:
    agent = hub.agent("n1")
    hub.wait_nodes(1)
    first_boot = hub.get("/nodes/n1")["boot"]
    for i in range(100):  # every drain toggle is one signed hub command; the window's bitmap outgrows 64 bits
        hub.post("/nodes/n1/drain", {"on": i % 2 == 0})
    hub.wait(lambda: hub_window_top(agent.data) >= 100, 30, "the agent to record 100 hub commands")
    agent.signal(signal.SIGTERM)
    assert agent.proc is not None
    agent.proc.wait(timeout=60)
    agent.start()
    hub.wait(lambda: hub.get("/nodes/n1")["boot"] > first_boot and liveness(hub, "n1") == "online", 30,
             "the restarted agent online")
    log = (agent.data.parent / "n1.log").read_text()
    assert "Traceback" not in log, log[-2000:]
    # It still obeys the hub: a new command after the restart is accepted, not refused as a replay.
    top = hub_window_top(agent.data)
    hub.post("/nodes/n1/drain", {"on": False})
    hub.wait(lambda: hub_window_top(agent.data) > top, 30, "a command after the restart")


def test_stalled_node_returns_without_reconnecting_and_moved_work_stays_moved(hub: HubProcess) -> None:
    stalled = hub.agent("n1")
    hub.wait_nodes(1)
    boot = hub.get("/nodes/n1")["boot"]
    run_id = hub.submit(LONG)
    hub.wait(lambda: any(a["state"] == "running" and a["node"] == "n1" for s in hub.get(f"/runs/{run_id}")["steps"]
                         for a in s["attempts"]), 30, "the long step running on n1")
    hub.agent("n2")
    hub.wait_nodes(2)
    stalled.signal(signal.SIGSTOP)  # past the failure timeout (3 heartbeats of 0.5 s), well inside MQTT keepalive
    try:
        hub.wait(lambda: liveness(hub, "n1") == "failed", 30, "n1 declared failed")
    finally:
        stalled.signal(signal.SIGCONT)
    hub.wait(lambda: liveness(hub, "n1") == "online", 30, "n1 online again")
    node = hub.get("/nodes/n1")
    assert node["boot"] == boot, "n1 came back by reconnecting, not by the rebirth rule"
    run = hub.wait_run(run_id, 60)
    assert run["state"] == "succeeded", run
    long_step = next(s for s in run["steps"] if s["id"] == "long")
    winners = [a for a in long_step["attempts"] if a["state"] == "succeeded"]
    assert len(winners) == 1 and winners[0]["node"] == "n2", long_step  # fencing: the moved step stayed moved


def test_broker_outage_that_the_hub_rides_out_last_strands_no_run(mosquitto: Broker, tmp_path: Path) -> None:
    """The broker is down 10 s; the nodes reconnect before the hub does, so the hub misses their births. Every run
    must still finish: the hub's new state asks for births, and heartbeats from nodes it holds failed do too."""
    hub = HubProcess(mosquitto, "out", tmp_path / "hub").start()
    try:
        hub.agent("n1")
        hub.agent("n2")
        hub.wait_nodes(2)
        runs = [hub.submit(TWO_STEPS) for _ in range(10)]
        hub.wait(lambda: any(a["state"] == "running" for r in runs for s in hub.get(f"/runs/{r}")["steps"]
                             for a in s["attempts"]), 30, "steps running")
        down_at = time.monotonic()
        mosquitto.stop()
        hub.wait(lambda: all(n["liveness"] == "failed" for n in hub.get("/nodes")), 30, "the hub to fail both nodes")
        assert hub.proc is not None
        hub.proc.send_signal(signal.SIGSTOP)  # the hub stays away until the nodes are back
        try:
            time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))  # the fault itself: a 10 s outage
            mosquitto.start()
            births = Observer(mosquitto, "fleetflow/v1/out/node/+/birth")
            try:
                deadline = time.monotonic() + 60
                while len({p for p in births.on("/birth")}) < 2:  # both nodes reconnected and announced themselves
                    assert time.monotonic() < deadline, "the agents did not reconnect"
                    time.sleep(0.1)
            finally:
                births.close()
        finally:
            hub.proc.send_signal(signal.SIGCONT)
        states = [hub.wait_run(r, 120)["state"] for r in runs]
        assert states == ["succeeded"] * len(runs), states
        hub.wait_nodes(2, timeout=30)
    finally:
        hub.stop()


def test_a_connection_with_the_nodes_old_client_id_does_not_fail_it(hub: HubProcess, mosquitto: Broker) -> None:
    hub.agent("n1")
    hub.wait_nodes(1)
    for _ in range(2):  # what knocked nodes offline: ids were `{fleet}.{node}`, and the broker drops the older one
        Publisher(mosquitto, client_id="rec.n1").close()
    seen = hub.get("/nodes/n1")["last_seen"]
    hub.wait(lambda: hub.get("/nodes/n1")["last_seen"] > seen + 2000, 30, "two more seconds of heartbeats")
    node = hub.get("/nodes/n1")
    failures = [h for h in node["history"] if h.get("kind") == "liveness" and h.get("state") == "failed"]
    assert not failures and node["liveness"] == "online", node["history"]
