"""TLS and passwords to the broker, trust on first use of the hub key, and replay protection across restarts: real
agent processes (exit codes, SIGTERM), under a real hub process where one is needed."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from agent.runtime.clock import now_ms
from agent.runtime.keys import load_key
from protocols import HUB_ID, Assign, Drain, Signer
from tests.agentprocess import AgentProcess
from tests.brokers import Broker, make_tls
from tests.hubprocess import HubProcess
from tests.nodewire import observed
from tests.waiting import wait
from tests.wire import Publisher


def test_tls_and_password_from_the_environment(tmp_path: Path) -> None:
    broker = Broker("mosquitto", tmp_path / "broker", tls=make_tls(tmp_path / "tls"), username="node",
                    password="s3cret-pw").start()
    # No hub here: the check is the agent's side of the connection (its log says whether the session came up).
    agents: list[AgentProcess] = []
    try:
        data = tmp_path / "n1" / "data"
        assert broker.tls is not None
        good = AgentProcess(broker, "f-tls", "n1", data, "00" * 32,
                            ("--ca-file", str(broker.tls.ca), "--username", "node", "--heartbeat", "0.2"),
                            env={"FLEETFLOW_PASSWORD": "s3cret-pw"}).start()
        bad = AgentProcess(broker, "f-tls", "n2", tmp_path / "n2" / "data", "00" * 32,
                           ("--ca-file", str(broker.tls.ca), "--username", "node"),
                           env={"FLEETFLOW_PASSWORD": "wrong-pw"}).start()
        agents += [good, bad]

        def logged(agent: AgentProcess, text: str) -> None:
            wait(lambda: text in agent.log(), 10, f"{agent.node_id} to log {text!r}")

        logged(good, "connected as n1")
        # Refused at its first connection: the agent exits (1) with one line naming the setting, no traceback;
        # a service manager restarts it. (A broker lost after a first connection is retried with backoff.)
        assert bad.wait_exit(15) == 1
        assert bad.log().strip().endswith(f"error: the broker at {broker.url} (--broker) refused the connection: "
                                          f"not authorized (check --username and FLEETFLOW_PASSWORD)")
        assert "Traceback" not in bad.log()
        for agent in (good, bad):
            assert "s3cret-pw" not in agent.log() and "wrong-pw" not in agent.log()
    finally:
        for agent in agents:
            agent.stop()
        broker.stop()


def test_password_flag_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "fleetflow"
    out = subprocess.run([str(exe), "agent", "run", "--broker", "mqtt://user:pw@127.0.0.1:1", "--fleet", "f",
                          "--node-id", "n", "--data", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "no credentials in the URL" in out.stderr and "pw" not in out.stdout


ONE_ECHO = json.dumps({"name": "one-echo", "version": "1.0.0",
                       "steps": [{"id": "s1", "uses": "echo", "with": {"k": 1}}]})


def test_trust_on_first_use_and_replay_after_restart(mosquitto: Broker, tmp_path: Path) -> None:
    with HubProcess(mosquitto, "f-tofu", tmp_path / "hub") as hub:
        careful = AgentProcess(mosquitto, hub.fleet, "n0", tmp_path / "n0" / "data", None)
        agent = AgentProcess(mosquitto, hub.fleet, "n1", tmp_path / "n1" / "data", None,
                             ("--heartbeat", "0.2", "--trust-first-hub-key"))
        hub.agents += [careful, agent]
        with observed(mosquitto, careful) as careful_wire, observed(mosquitto, agent) as wire:
            careful.start()
            agent.start()
            assert careful.wait_exit(30) == 2  # no hub key and no explicit first-use trust: refused at start
            assert "--trust-first-hub-key" in careful.log() and not careful_wire.kinds()
            first = wait(lambda: wire.of("birth"), 20, "birth after pinning the hub key")[0]
            assert "TRUST ON FIRST USE: pinned hub key" in agent.log()
            run_id = hub.submit(ONE_ECHO)
            assert hub.wait_run(run_id, 15)["state"] == "succeeded"
            captured = next(c for c in wire.commands(bytes.fromhex(hub.public_key))
                            if isinstance(c.message.body, Assign))
            agent.signal(signal.SIGTERM)
            assert agent.wait_exit(15) == 0
            agent.start()
            wait(lambda: [b for b in wire.of("birth") if b.header.boot > first.header.boot], 20, "a birth after restart")
            attacker = Publisher(mosquitto)
            try:
                attacker.publish_all([(captured.topic, captured.payload)], qos=1)  # a captured command, replayed
            finally:
                attacker.close()
            wait(lambda: (hbs := wire.heartbeats()) and hbs[-1].rejected.get("replayed"), 10,
                 "replay refused after restart")
            assert len(wire.results()) == 1
            assert [len(s["attempts"]) for s in hub.get(f"/runs/{run_id}")["steps"]] == [1]
            assert not wire.refused
            agent.stop()
    # Another hub (another key) on the same fleet once the first is gone: its retained state is the first a
    # restarted node sees, yet the pinned key stays, and the node does not obey the other hub.
    with HubProcess(mosquitto, "f-tofu", tmp_path / "rogue") as rogue, observed(mosquitto, agent) as wire:
        rogue.agents.append(agent.start())
        wait(lambda: wire.of("birth"), 20, "birth")
        signer = Signer(load_key(rogue.data / "hub.key"), rogue.fleet, HUB_ID, boot=1)
        drain = signer.seal(Drain(True), now_ms(), dst="n1", ttl_ms=10_000)
        attacker = Publisher(mosquitto)
        try:
            attacker.publish_all([(drain.topic, drain.payload)], qos=1)
        finally:
            attacker.close()
        wait(lambda: (hbs := wire.heartbeats()) and hbs[-1].rejected.get("unknown-key", 0) >= 2, 10,
             "the other hub's state and drain refused")
        assert not wire.heartbeats()[-1].draining
        assert agent.log().count("TRUST ON FIRST USE") == 1  # pinned at the first start only
