"""A real agent process under a real hub process: enrollment, birth, heartbeats, telemetry, death on kill -9 and on
SIGTERM, as a third party on the broker sees them."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from protocols import Birth, Death, Telemetry
from tests.agentprocess import AgentProcess
from tests.brokers import Broker
from tests.hubprocess import HubProcess
from tests.nodewire import observed
from tests.waiting import wait


def agent_for(hub: HubProcess, tmp_path: Path, node: str = "n1") -> AgentProcess:
    agent = AgentProcess(hub.broker, hub.fleet, node, tmp_path / node / "data", hub.public_key,
                         ("--heartbeat", "0.5", "--telemetry", "0.5"))
    hub.agents.append(agent)  # stopped with the hub
    return agent


def test_enroll_birth_heartbeat_telemetry_and_kill9_death(mosquitto: Broker, tmp_path: Path) -> None:
    with HubProcess(mosquitto, "f-session", tmp_path / "hub") as hub:
        agent = agent_for(hub, tmp_path)
        with observed(mosquitto, agent) as wire:
            agent.start()
            birth = wait(lambda: wire.of("birth"), 20, "birth")[0]
            assert wire.kinds().index("enroll") < wire.kinds().index("birth"), "the agent enrolled before its birth"
            assert isinstance(birth.body, Birth) and birth.body.profile == "container"
            assert {"noop", "echo", "sleep", "fail"} <= set(birth.body.caps)
            assert "shell" not in birth.body.caps  # dangerous executors are off by default
            wait(lambda: len(wire.heartbeats()) >= 2 and wire.of("tel"), 15, "hb and tel")
            assert wire.heartbeats()[-1].free == birth.body.slots
            tel = wire.of("tel")[-1].body
            assert isinstance(tel, Telemetry) and {"cpu", "mem", "rss_mb"} <= set(tel.metrics)
            hub.wait_nodes(1)
            killed = time.monotonic()
            agent.kill()
            deaths = wait(lambda: wire.deaths(), 10, "death certificate")
            assert time.monotonic() - killed < 2.0
            assert deaths == [(birth.header.boot, Death("lost"))]
            hub.wait(lambda: hub.get("/nodes/n1")["liveness"] == "failed", 10, "the hub to hold n1 failed")
            assert not wire.refused and hub.metric("fleetflow_rejected") == 0  # all signed, nothing replayed


NAP = json.dumps({"name": "nap", "version": "1.0.0", "steps": [{"id": "nap", "uses": "sleep",
                                                                 "with": {"seconds": 1.0}}]})


def test_sigterm_finishes_the_step_then_dies_cleanly(mosquitto: Broker, tmp_path: Path) -> None:
    with HubProcess(mosquitto, "f-term", tmp_path / "hub") as hub:
        agent = agent_for(hub, tmp_path)
        with observed(mosquitto, agent) as wire:
            agent.start()
            hub.wait_nodes(1)
            run_id = hub.submit(NAP)
            wait(lambda: wire.events("started"), 10, "started")
            agent.signal(signal.SIGTERM)
            assert agent.wait_exit(20) == 0
            deaths = wait(lambda: wire.deaths(), 10, "death certificate")
            assert [death.reason for _, death in deaths] == ["shutdown"]
            results = wire.results()
            assert [r.step for r in results] == ["nap"] and results[0].ok
            # the result was delivered (and acknowledged) before the death
            assert [kind for kind in wire.kinds() if kind in ("result", "death")] == ["result", "death"]
            # so the hub accepted it from the attempt it assigned, and moved nothing when the node left
            run = hub.wait_run(run_id, 10)
            assert run["state"] == "succeeded" and [len(s["attempts"]) for s in run["steps"]] == [1], run
            hub.wait(lambda: hub.get("/nodes/n1")["liveness"] == "offline", 10, "the hub to hold n1 offline")
