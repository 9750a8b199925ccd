"""TLS and passwords to the broker, trust on first use of the hub key, and replay protection across restarts."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from protocols import Assign, Drain
from tests.brokers import Broker, make_tls
from tests.hubdouble import AgentProcess, HubDouble


def test_tls_and_password_from_the_environment(tmp_path: Path) -> None:
    broker = Broker("mosquitto", tmp_path / "broker", tls=make_tls(tmp_path / "tls"), username="node",
                    password="s3cret-pw").start()
    # No hub here: the check is the agent's side of the connection (its log says whether the session came up).
    try:
        data = tmp_path / "n1" / "data"
        assert broker.tls is not None
        good = AgentProcess(broker, "f-tls", "n1", data, "00" * 32,
                            ("--ca-file", str(broker.tls.ca), "--username", "node", "--heartbeat", "0.2"),
                            env={"FLEETFLOW_PASSWORD": "s3cret-pw"}).start()
        bad = AgentProcess(broker, "f-tls", "n2", tmp_path / "n2" / "data", "00" * 32,
                           ("--ca-file", str(broker.tls.ca), "--username", "node"),
                           env={"FLEETFLOW_PASSWORD": "wrong-pw"}).start()

        async def scenario() -> None:
            async def logged(agent: AgentProcess, text: str) -> None:
                for _ in range(200):
                    if text in agent.log():
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError(f"{agent.node_id} never logged {text!r}:\n{agent.log()[-2000:]}")

            await logged(good, "connected as n1")
            # Refused at its first connection: the agent exits (1) with one line naming the setting, no traceback;
            # a service manager restarts it. (A broker lost after a first connection is retried with backoff.)
            assert await bad.wait_exit(15) == 1
            assert bad.log().strip().endswith(f"error: the broker at {broker.url} (--broker) refused the connection: "
                                              f"not authorized (check --username and FLEETFLOW_PASSWORD)")
            assert "Traceback" not in bad.log()

        asyncio.run(scenario())
        for agent in (good, bad):
            assert "s3cret-pw" not in agent.log() and "wrong-pw" not in agent.log()
        good.stop()
    finally:
        broker.stop()


def test_password_flag_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "fleetflow"
    out = subprocess.run([str(exe), "agent", "run", "--broker", "mqtt://user:pw@127.0.0.1:1", "--fleet", "f",
                          "--node-id", "n", "--data", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "no credentials in the URL" in out.stderr and "pw" not in out.stdout


def test_trust_on_first_use_and_replay_after_restart(broker: Broker, tmp_path: Path) -> None:
    data = tmp_path / "n1" / "data"

    async def scenario() -> None:
        async with HubDouble(broker, "f-tofu") as hub:
            careful = AgentProcess(broker, hub.fleet, "n0", tmp_path / "n0" / "data", None).start()
            assert await careful.wait_exit(30) == 2  # no hub key and no explicit first-use trust: refused at start
            assert "--trust-first-hub-key" in careful.log() and not hub.of("birth", "n0")
            agent = AgentProcess(broker, hub.fleet, "n1", data, None,
                                 ("--heartbeat", "0.2", "--trust-first-hub-key")).start()
            try:
                await hub.wait_for(lambda: hub.of("birth", "n1"), 20, "birth after pinning the hub key")
                assert "TRUST ON FIRST USE: pinned hub key" in agent.log()
                captured = await hub.send("n1", Assign("r1", "s1", "a1", 1, "echo", {"k": 1}, 60))
                await hub.wait_for(lambda: hub.results("n1"), 10, "result")
                agent.signal(signal.SIGTERM)
                assert await agent.wait_exit(15) == 0
                agent.start()
                await hub.wait_for(lambda: len(hub.of("birth", "n1")) == 2, 20, "second birth")
                await hub.publish_raw(captured.topic, captured.payload)  # an attacker replays a captured command
                await hub.wait_for(lambda: hub.of("hb", "n1") and
                                   hub.of("hb", "n1")[-1].body.rejected.get("replayed"),  # type: ignore[attr-defined]
                                   10, "replay refused after restart")
                assert len(hub.results("n1")) == 1
                keyring = hub.receiver.keyring
            finally:
                agent.stop()
        # Another hub (another key) on the same fleet: the pinned key is not silently replaced.
        async with HubDouble(broker, "f-tofu") as rogue:
            rogue.receiver.keyring = keyring  # the rogue can read the node; the node must not obey the rogue
            agent.start()
            try:
                await rogue.wait_for(lambda: rogue.of("birth", "n1"), 20, "birth")
                await rogue.send("n1", Drain(True))
                await rogue.wait_for(lambda: rogue.of("hb", "n1") and
                                     rogue.of("hb", "n1")[-1].body.rejected.get("unknown-key", 0) >= 2,  # type: ignore[attr-defined]
                                     10, "rogue hub refused")
                assert not rogue.of("hb", "n1")[-1].body.draining  # type: ignore[attr-defined]
            finally:
                agent.stop()

    asyncio.run(scenario())
