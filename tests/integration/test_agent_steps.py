"""Steps: results, shell timeouts with children and cancel on a real agent process under a real hub process; commands
the hub would never send, refused and counted, on the real hub and agent in one process (in-memory broker)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import nacl.signing

from agent.runtime.memory import MemoryTransport
from protocols import HUB_ID, Assign, Drain, Signer
from sim.inprocess import virtual_clock_ms
from tests.agentprocess import AgentProcess
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.memoryfleet import FLEET, MemoryFleet, run_fleet
from tests.nodewire import observed
from tests.waiting import wait


def workflow(name: str, step: dict[str, Any]) -> str:
    """A one-step workflow as the API takes it (JSON is YAML)."""
    return json.dumps({"name": name, "version": "1.0.0", "steps": [{"retry": {"max_attempts": 1}, **step}]})


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_echo_fail_shell_timeout_and_cancel(mosquitto: Broker, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    pidfile = tmp_path / "child.pid"
    config.write_text('[shell]\nenabled = true\nallow = ["/bin/sh"]\n')
    # a shell step whose background child would outlive it; the timeout must kill both
    script = f"sleep 60 & echo $! > {pidfile}; wait"

    with HubProcess(mosquitto, "f-steps", tmp_path / "hub") as hub:
        agent = AgentProcess(mosquitto, hub.fleet, "n1", tmp_path / "n1" / "data", hub.public_key,
                             ("--heartbeat", "0.3", "--telemetry", "5", "--config", str(config),
                              "--max-concurrent", "4"))
        hub.agents.append(agent)
        with observed(mosquitto, agent) as wire:
            agent.start()
            hub.wait_nodes(1)
            runs = {name: hub.submit(workflow(name, step)) for name, step in (
                ("echo", {"id": "echo", "uses": "echo", "with": {"x": [1, "two"]}}),
                ("fail", {"id": "fail", "uses": "fail", "with": {"message": "valve stuck"}}),
                ("shell", {"id": "shell", "uses": "shell", "with": {"argv": ["/bin/sh", "-c", script]},
                           "timeout": 1.0}),
                ("long", {"id": "long", "uses": "sleep", "with": {"seconds": 60}, "timeout": 120}))}
            wait(lambda: len(wire.events("started")) >= 4, 10, "four started")
            hub.post(f"/runs/{runs['long']}/cancel", {"reason": "operator"})
            states = {name: hub.wait_run(run_id, 15)["state"] for name, run_id in runs.items()}
            assert states == {"echo": "succeeded", "fail": "failed", "shell": "failed", "long": "cancelled"}, states
            cancelled = wait(lambda: wire.events("cancelled"), 10, "the cancelled step's event")
            assert [(e.step, e.reason) for e in cancelled] == [("long", "operator")]
            by_step = {r.step: r for r in wire.results()}
            assert by_step["echo"].ok and by_step["echo"].output == {"x": [1, "two"]}
            assert not by_step["fail"].ok and by_step["fail"].error == "valve stuck"
            assert not by_step["shell"].ok and "timed out" in (by_step["shell"].error or "")
            child = int(pidfile.read_text())
            deadline = time.monotonic() + 5
            while pid_alive(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not pid_alive(child), "the shell step's background child survived the timeout"
            # a command not on the allowlist fails the step, it is not run
            bad = hub.submit(workflow("bad", {"id": "bad", "uses": "shell",
                                              "with": {"argv": ["/bin/rm", "-rf", str(tmp_path / "x")]}}))
            assert hub.wait_run(bad, 15)["state"] == "failed"
            refused = wait(lambda: [r for r in wire.results() if r.step == "bad"], 10, "the refused shell's result")
            assert "allowlist" in (refused[0].error or "")
            assert not wire.refused


ONE_ECHO = {"name": "one-echo", "version": "1.0.0", "steps": [{"id": "s1", "uses": "echo", "with": {"n": 1}}]}


def test_bad_commands_are_refused_and_counted_while_work_goes_on(tmp_path: Path) -> None:
    async def scenario(fleet: MemoryFleet) -> None:
        fleet.start_agent("n1", heartbeat=0.3)
        wire = fleet.wire("n1")
        await fleet.wait(lambda: fleet.online("n1"), 30, "n1 online")
        first = await fleet.submit(ONE_ECHO)
        assert await fleet.wait(lambda: fleet.finished(first), 30, "the first run") == "succeeded"
        captured = next(c for c in wire.commands(fleet.hub.public_key) if isinstance(c.message.body, Assign))
        assign: Assign = captured.message.body  # type: ignore[assignment]
        # Sealed with the hub's own signer (its key and its sequence numbers), as the hub never would.
        hub_signer = fleet.hub.signer
        now = virtual_clock_ms()
        impostor = Signer(nacl.signing.SigningKey.generate(), FLEET, HUB_ID, boot=hub_signer.boot)
        forged = impostor.seal(Drain(True), now, dst="n1", ttl_ms=10_000)
        other = hub_signer.seal(Drain(True), now, dst="n2", ttl_ms=10_000)
        expired = hub_signer.seal(Drain(True), now - 60_000, dst="n1", ttl_ms=1_000)
        stale = hub_signer.seal(dataclasses.replace(assign, attempt="a0", fence=assign.fence - 1), now, dst="n1",
                                ttl_ms=10_000)
        async with MemoryTransport(fleet.broker, "attacker").connect("attacker-1", None) as attacker:
            await attacker.publish(forged.topic, forged.payload, qos=1)  # 1. signed by a key that is not the hub's
            await attacker.publish(other.topic.replace("/n2/", "/n1/"), other.payload,
                                   qos=1)  # 2. a command for another node, moved onto n1's topic
            await attacker.publish(expired.topic, expired.payload, qos=1)  # 3. expired
            await attacker.publish(captured.topic, captured.payload, qos=1)  # 4. replayed: captured, sent again
            await attacker.publish(stale.topic, stale.payload, qos=1)  # 5. a stale fence for the same (run, step)
            await attacker.publish(captured.topic, b"\x00garbage", qos=1)  # 6. not an envelope at all

        def counted() -> dict[str, int]:
            """The latest heartbeat's rejection counts, once they name every kind sent."""
            hbs = wire.heartbeats()
            rejected = hbs[-1].rejected if hbs else {}
            want = {"unknown-key", "wrong-topic", "expired", "replayed", "malformed"}
            return rejected if want <= set(rejected) else {}

        rejected = await fleet.wait(counted, 15, "rejections counted in heartbeats")
        assert rejected["replayed"] == 1 and rejected["expired"] == 1
        refused = await fleet.wait(lambda: wire.events("refused"), 10, "the stale fence's refusal")
        assert [(e.attempt, e.reason) for e in refused] == [("a0", "stale-fence")]
        # drain never took effect (every drain was forged, misdirected or expired) and work goes on
        assert not wire.heartbeats()[-1].draining
        assert not fleet.hub.core.nodes["n1"].draining
        later = await fleet.submit(ONE_ECHO)
        assert await fleet.wait(lambda: fleet.finished(later), 30, "a later run") == "succeeded"
        assert [r.attempt for r in wire.results()].count(assign.attempt) == 1
        assert not wire.refused

    run_fleet(tmp_path, scenario)
