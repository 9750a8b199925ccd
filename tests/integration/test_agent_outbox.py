"""The outbox across a broker outage and kill -9, and when it is full."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from protocols import Assign
from tests.brokers import Broker
from tests.hubdouble import AgentProcess, HubDouble


def outbox_results(data: Path) -> int:
    db = sqlite3.connect(data / "outbox.sqlite")
    try:
        return int(db.execute("SELECT COUNT(*) FROM entries WHERE type = 'result'").fetchone()[0])
    finally:
        db.close()


async def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_results_survive_broker_outage_and_kill9(broker: Broker, tmp_path: Path) -> None:
    data = tmp_path / "n1" / "data"

    async def scenario() -> None:
        async with HubDouble(broker, "f-outage") as hub:
            agent = AgentProcess(broker, hub.fleet, "n1", data, hub.public_key_hex,
                                 ("--heartbeat", "0.3", "--max-concurrent", "4")).start()
            try:
                birth = await hub.wait_for(lambda: hub.of("birth", "n1"), 20, "birth")
                first_boot = birth[0].header.boot
                for i in range(3):
                    await hub.send("n1", Assign("r1", f"s{i}", f"a{i}", 1, "sleep", {"seconds": 0.5 + 0.3 * i}, 30))
                await hub.wait_for(lambda: len(hub.events("n1", "started")) == 3, 10, "three started")
                keyring = hub.receiver.keyring
            except BaseException:
                agent.stop()
                raise
        broker.kill()
        try:
            await wait_until(lambda: outbox_results(data) == 3, 15, "three results on disk")
            agent.kill()  # kill -9 with the results only on disk
            agent.start()  # restarts while the broker is still down: its first connection fails, so it exits (1)
            assert await agent.wait_exit(30) == 1
        finally:
            broker.start()
        agent.start()  # as a service manager's Restart= does
        async with HubDouble(broker, "f-outage", key=hub.key, boot=2) as hub2:
            hub2.receiver.keyring = keyring
            try:
                await hub2.wait_for(lambda: len(hub2.results("n1")) >= 3, 30, "results after the outage")
                await asyncio.sleep(1.0)  # anything sent twice would show up now
                results = hub2.results("n1")
                assert [r.attempt for r in results] == ["a0", "a1", "a2"], "each result once, in order"
                assert all(r.ok for r in results)
                eids = [r.eid for r in results]
                assert eids == sorted(eids)
                # births are not retained, and this hub may have subscribed after the agent's; results carry the boot
                new_boot = hub2.of("result", "n1")[0].header.boot
                assert new_boot > first_boot + 1  # one boot per start and per session
                await wait_until(lambda: outbox_results(data) == 0, 10, "acknowledged results deleted")
            finally:
                agent.stop()

    asyncio.run(scenario())


def outbox_counter(data: Path, name: str) -> int:
    db = sqlite3.connect(data / "outbox.sqlite")
    try:
        row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


def test_full_outbox_sheds_telemetry_keeps_results_and_refuses_work(broker: Broker, tmp_path: Path) -> None:
    data = tmp_path / "n1" / "data"
    config = tmp_path / "agent.toml"
    # 2 slots x (1 KiB step limit + 1 KiB) are reserved, so new work is admitted below 8000 - 4096 bytes.
    config.write_text("outbox_max_bytes = 8000\nmax_step_bytes = 1024\nmax_concurrent = 2\n")

    async def scenario() -> None:
        async with HubDouble(broker, "f-full", auto_ack=False) as hub:
            agent = AgentProcess(broker, hub.fleet, "n1", data, hub.public_key_hex,
                                 ("--config", str(config), "--heartbeat", "0.2", "--telemetry", "0.05")).start()
            try:
                await hub.wait_for(lambda: hub.of("birth", "n1"), 20, "birth")
                admitted = 0
                for i in range(40):  # unacknowledged results pile up until the agent refuses work
                    await hub.send("n1", Assign("r1", f"s{i}", f"a{i}", 1, "echo", {"blob": "x" * 500}, 10))
                    await hub.wait_for(lambda: any(r.attempt == f"a{i}" for r in hub.results("n1"))
                                       or hub.events("n1", "refused"), 10, f"outcome of a{i}")
                    if hub.events("n1", "refused"):
                        break
                    admitted += 1
                refused = hub.events("n1", "refused")
                assert refused and refused[0].reason == "outbox-full" and admitted >= 2
                assert outbox_results(data) == admitted  # every admitted step's result is kept
                keyring = hub.receiver.keyring
            except BaseException:
                agent.stop()
                raise
        broker.kill()  # offline: telemetry now has to wait in the full outbox, so it is shed
        try:
            await wait_until(lambda: outbox_counter(data, "shed") >= 5, 15, "telemetry shed while offline")
        finally:
            broker.start()
        async with HubDouble(broker, "f-full", key=hub.key, boot=2, auto_ack=False) as hub2:
            hub2.receiver.keyring = keyring
            try:
                await hub2.wait_for(lambda: [m for m in hub2.of("hb", "n1") if m.body.shed >= 5],  # type: ignore[attr-defined]
                                    20, "shed count in a heartbeat")
                assert outbox_results(data) == admitted
                await hub2.wait_for(lambda: len({r.attempt for r in hub2.results("n1")}) == admitted, 20, "resent")
                from protocols import Ack

                await hub2.send("n1", Ack(tuple(r.eid for r in hub2.results("n1"))))
                await wait_until(lambda: outbox_results(data) == 0, 10, "results deleted after ack")
                await hub2.send("n1", Assign("r2", "later", "b2", 1, "echo", {}, 10))
                await hub2.wait_for(lambda: [r for r in hub2.results("n1") if r.attempt == "b2"], 10, "work resumes")
            finally:
                agent.stop()

    asyncio.run(scenario())
