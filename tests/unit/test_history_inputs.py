"""What the history checker reads, read the way `fleetflow sim` and `fleetflow demo` read it: the hub's journal
through `fleetflow journal export` (read-only, while the hub holds it open), an agent's outbox file while the agent
holds it open; and the demo's broker, which carries the wire the recorder sees."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.outbox import Outbox
from hub.events import NodeBorn, ResultReported, RunSubmitted
from hub.journal import Journal
from hub.journal_commands import export
from hub.workflow import workflow_from_data
from hub.embedded_broker import SnapshotSubscriptions
from sim.evidence import load_export, node_keys, read_outbox

SPEC = workflow_from_data({"name": "t", "steps": [{"id": "a", "uses": "echo"}]}).model_dump(by_alias=True, mode="json")


def fleetflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "fleetflow"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_journal_exports_while_the_hub_holds_it_and_reads_back_the_same(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")  # the hub's connection, left open as a running hub's is
    events = [NodeBorn(1, "n1", 2, "rpi4", {"class": "sbc"}, ("echo", "sensor"), 4, {"cores": 4.0}, (), 5.0),
              RunSubmitted(2, "r1", SPEC, {"x": 1}, None, 10**12),
              ResultReported(3, "n1", "a1", 1, True, {"blob": "ok"}, None)]
    journal.append_now(events, {"n1": (2, 17, False)})
    out = io.StringIO()
    assert export(tmp_path / "journal.sqlite", out) == 4
    lines = out.getvalue().splitlines()
    assert json.loads(lines[0]) == {"seq": 1, "at": 1, "kind": "node_born", "node": "n1", "boot": 2, "profile": "rpi4",
                                    "labels": {"class": "sbc"}, "caps": ["echo", "sensor"], "slots": 4,
                                    "resources": {"cores": 4.0}, "running": [], "hb": 5.0, "tel": 10.0}
    assert load_export(lines) == (events, {"n1": (2, 17, False)})
    journal.append_now([RunSubmitted(4, "r2", SPEC, {}, None, 10**12)])  # the writer was never blocked
    journal.close()

    done = fleetflow("journal", "export", "--data", str(tmp_path), "--out", str(tmp_path / "out.jsonl"))
    assert done.returncode == 0 and "5 lines written" in done.stderr, done.stderr
    assert [json.loads(line)["kind"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [
        "node_born", "run_submitted", "result_reported", "run_submitted", "replay_mark"]
    missing = fleetflow("journal", "export", "--data", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no journal at" in missing.stderr and "Traceback" not in missing.stderr


def test_an_outbox_is_read_while_its_agent_holds_it(tmp_path: Path) -> None:
    (tmp_path / "n1").mkdir()
    outbox = Outbox(tmp_path / "n1" / "outbox.sqlite")
    first = outbox.add_event("result", {"run": "r1", "step": "a", "attempt": "a1", "fence": 3, "ok": True}, 100)
    second = outbox.add_event("step", {"run": "r1", "step": "a", "attempt": "a1", "fence": 3, "event": "started"}, 90)
    outbox.add_telemetry({"metrics": {"cpu": 1.0}, "at": 95}, 95)
    outbox.raise_fence("r1", "a", 3, 80)
    outbox.remove([second])  # acknowledged: gone
    found = read_outbox(tmp_path / "n1" / "outbox.sqlite")
    assert [(e.eid, e.type, e.body["attempt"]) for e in found.entries] == [(first, "result", "a1")]  # no telemetry
    assert found.fences == {("r1", "a"): 3}
    outbox.close()
    (tmp_path / "n1" / "node.key.pub").write_text("ab" * 32 + "\n")
    assert node_keys(tmp_path, ["n1", "n2"]) == {"n1": bytes.fromhex("ab" * 32)}


def test_the_embedded_broker_s_subscription_table_survives_changes_while_it_is_iterated() -> None:
    """amqtt 0.12 awaits inside loops over its subscription table; a client subscribing meanwhile broke the loop (and
    left a half-open session: sim/broker.py). The table the demo's broker gets iterates over a snapshot."""

    async def race(table: dict[str, Any]) -> list[str]:
        seen = []

        async def subscribe_more() -> None:
            table["t/0"].pop(0)  # a subscriber leaves while the broadcast walks the topic's list
            for i in range(1, 5):
                table[f"t/{i}"] = [("session", 1)]
                await asyncio.sleep(0)

        async def broadcast() -> None:
            for topic in table:  # noqa: PLC0206  # as amqtt does: by key, awaiting inside
                for _session in table[topic]:
                    await asyncio.sleep(0)
                seen.append(topic)
                await asyncio.sleep(0)

        await asyncio.gather(broadcast(), subscribe_more())
        return seen

    with pytest.raises(RuntimeError, match="changed size during iteration"):
        asyncio.run(race({"t/0": [("a", 1), ("b", 1)]}))
    assert asyncio.run(race(SnapshotSubscriptions({"t/0": [("a", 1), ("b", 1)]}))) == ["t/0"]
