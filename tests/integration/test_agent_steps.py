"""Steps on a real agent process: results, shell timeouts with children, cancel, and refused commands."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import nacl.signing

from protocols import Assign, AttemptRef, Cancel, Drain, Signer
from tests.brokers import Broker
from tests.hubdouble import AgentProcess, HubDouble, now_ms


def start(broker: Broker, tmp_path: Path, hub: HubDouble, *args: str) -> AgentProcess:
    return AgentProcess(broker, hub.fleet, "n1", tmp_path / "n1" / "data", hub.public_key_hex,
                        ("--heartbeat", "0.3", "--telemetry", "5", *args)).start()


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


def test_echo_fail_shell_timeout_and_cancel(broker: Broker, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    pidfile = tmp_path / "child.pid"
    config.write_text('[shell]\nenabled = true\nallow = ["/bin/sh"]\n')

    async def scenario() -> None:
        async with HubDouble(broker, "f-steps") as hub:
            agent = start(broker, tmp_path, hub, "--config", str(config), "--max-concurrent", "4")
            try:
                await hub.wait_for(lambda: hub.of("birth", "n1"), 20, "birth")
                await hub.send("n1", Assign("r1", "echo", "a1", 1, "echo", {"x": [1, "two"]}, 10))
                await hub.send("n1", Assign("r1", "fail", "a2", 1, "fail", {"message": "valve stuck"}, 10))
                # a shell step whose background child would outlive it; the timeout must kill both
                script = f"sleep 60 & echo $! > {pidfile}; wait"
                await hub.send("n1", Assign("r1", "shell", "a3", 1, "shell", {"argv": ["/bin/sh", "-c", script]}, 1.0))
                await hub.send("n1", Assign("r1", "long", "a4", 1, "sleep", {"seconds": 60}, 120))
                await hub.wait_for(lambda: len(hub.events("n1", "started")) >= 4, 10, "four started")
                await hub.send("n1", Cancel((AttemptRef("r1", "long", "a4", 1),), "operator"))
                await hub.wait_for(lambda: len(hub.results("n1")) >= 3 and hub.events("n1", "cancelled"), 15,
                                   "results and cancel")
                by_attempt = {r.attempt: r for r in hub.results("n1")}
                assert by_attempt["a1"].ok and by_attempt["a1"].output == {"x": [1, "two"]}
                assert not by_attempt["a2"].ok and by_attempt["a2"].error == "valve stuck"
                assert not by_attempt["a3"].ok and "timed out" in (by_attempt["a3"].error or "")
                cancelled = hub.events("n1", "cancelled")
                assert [e.attempt for e in cancelled] == ["a4"] and cancelled[0].reason == "operator"
                child = int(pidfile.read_text())
                deadline = time.monotonic() + 5
                while pid_alive(child) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert not pid_alive(child), "the shell step's background child survived the timeout"
                # a command not on the allowlist fails the step, it is not run
                await hub.send("n1", Assign("r2", "bad", "b1", 1, "shell", {"argv": ["/bin/rm", "-rf", "/tmp/x"]}, 5))
                await hub.wait_for(lambda: any(r.attempt == "b1" for r in hub.results("n1")), 10, "refused shell")
                assert "allowlist" in next(r.error for r in hub.results("n1") if r.attempt == "b1")  # type: ignore[operator]
            finally:
                agent.stop()

    asyncio.run(scenario())


def test_bad_commands_are_refused_and_counted_while_work_goes_on(broker: Broker, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with HubDouble(broker, "f-bad") as hub:
            agent = start(broker, tmp_path, hub)
            try:
                await hub.wait_for(lambda: hub.of("birth", "n1"), 20, "birth")
                # 1. signed by a key that is not the hub's
                impostor = Signer(nacl.signing.SigningKey.generate(), "f-bad", "hub", boot=1)
                forged = impostor.seal(Drain(True), now_ms(), dst="n1", ttl_ms=10_000)
                await hub.publish_raw(forged.topic, forged.payload)
                # 2. a command for another node, moved onto n1's topic
                other = hub.signer.seal(Drain(True), now_ms(), dst="n2", ttl_ms=10_000)
                await hub.publish_raw(other.topic.replace("/n2/", "/n1/"), other.payload)
                # 3. expired
                old = hub.signer.seal(Drain(True), now_ms() - 60_000, dst="n1", ttl_ms=1_000)
                await hub.publish_raw(old.topic, old.payload)
                # 4. replayed: a valid command sent twice
                ok = await hub.send("n1", Assign("r1", "s1", "a1", 5, "echo", {"n": 1}, 10))
                await hub.publish_raw(ok.topic, ok.payload)
                # 5. a stale fence: fence 4 after fence 5 for the same (run, step)
                await hub.send("n1", Assign("r1", "s1", "a0", 4, "echo", {"n": 0}, 10))
                # 6. bytes that are not an envelope at all
                await hub.publish_raw(ok.topic, b"\x00garbage")

                def counted() -> dict[str, int] | None:
                    hbs = hub.of("hb", "n1")
                    rejected = hbs[-1].body.rejected if hbs else {}  # type: ignore[attr-defined]
                    want = {"unknown-key", "wrong-topic", "expired", "replayed", "malformed"}
                    return rejected if want <= set(rejected) else None

                rejected = await hub.wait_for(counted, 15, "rejections counted in heartbeats")
                assert rejected["replayed"] == 1 and rejected["expired"] == 1
                stale = await hub.wait_for(lambda: hub.events("n1", "refused"), 10, "stale fence refusal")
                assert stale[0].attempt == "a0" and stale[0].reason == "stale-fence"
                # drain never took effect (every drain was forged, misdirected or expired) and work goes on
                assert not hub.of("hb", "n1")[-1].body.draining  # type: ignore[attr-defined]
                await hub.send("n1", Assign("r2", "s1", "a9", 1, "echo", {"still": "working"}, 10))
                await hub.wait_for(lambda: [r for r in hub.results("n1") if r.attempt == "a9"], 10, "later step")
                assert [r.attempt for r in hub.results("n1")].count("a1") == 1
            finally:
                agent.stop()

    asyncio.run(scenario())
