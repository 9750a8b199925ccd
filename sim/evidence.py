"""What the history checker (sim/history.py) judges, and how it is read: never the hub's API.

- the wire: every message the broker carried (the in-memory broker's log in the deterministic simulation, a
  recorder's subscription against a real broker: sim/recorder.py), in one form, `WireRecord`;
- the hub's journal, from its file (`fleetflow journal export`, hub/journal_commands.py) with the replay marks; an
  event's position in it (1, 2, ...) is its seq, the order of the commits;
- every agent's outbox file, the crashed agents' too: what is still unacknowledged, and the fences it holds;
- the fault log: the messages a fault put on the wire on purpose, the devices it powered off or cut off;
- the scenario's expectations: how each submitted run must end.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import KEY_FILE, OutboxEntry
from agent.runtime.keys import public_path
from agent.runtime.memory import Delivery, WireRecord
from hub.events import Event, from_record
from hub.journal import Mark
from hub.journal_commands import MARK_KIND, open_read_only
from hub.state import Core
from protocols import HUB_ID, Message, ProtocolError, cbor, open_envelope
from protocols.envelope import parse
from protocols.messages import decode_payload

from .recorder import Gap

OUTBOX_FILE = "outbox.sqlite"  # in an agent's data directory (agent/node.py)
SETTLE_S = 20.0  # what was sent or stored this close to the end may still be on its way (resent after 15 s)
StepKey = tuple[str, str]  # (run, step)


@dataclass(frozen=True, slots=True)
class Injected:
    """A message a fault put on the wire on purpose: `forged` (signed with a key that is not the sender's) or
    `replayed` (a byte-for-byte copy of one the sender sent earlier)."""

    kind: str
    topic: str
    payload: bytes


@dataclass
class FaultLog:
    """What the faults did, in the terms the checker needs."""

    injected: list[Injected] = field(default_factory=list)
    killed: dict[str, int] = field(default_factory=dict)       # node -> ms its power was cut
    partitioned: dict[str, int] = field(default_factory=dict)  # node -> ms its partition began
    down_at_end: set[str] = field(default_factory=set)         # powered off for good: their outboxes may keep entries
    cut_failed: list[str] = field(default_factory=list)        # sent a power cut, but their agent outlived it
    # A fault that could end any device's attempts (a broker restart, the deterministic simulation's lossy network and
    # random agent crashes): the checker then cannot excuse a lost attempt by its node's name alone.
    anywhere: bool = False


@dataclass
class Evidence:
    epoch_ms: int                        # the hub clock at wire time 0 (wire times are seconds from it)
    keys: dict[str, bytes]               # sender id (node ids, "hub") -> public key
    wire: list[WireRecord]
    deliveries: list[Delivery]           # the in-memory broker's deliveries (empty for a recording)
    journal: list[Event]
    outboxes: dict[str, list[OutboxEntry]]  # node -> entries left at the end, for every node (crashed ones too)
    submitted: list[str]
    final_core: Core | None              # the running hub's core at the end (None: not known, or no hub was up)
    core_class: type[Core] = Core
    quiet_end: bool = True               # every fault healed well before the end: outboxes must have drained
    end: float = float("inf")            # wire time when the history stopped
    expected: dict[str, frozenset[str]] = field(default_factory=dict)  # run id -> the terminal states it may end in
    labels: dict[str, str] = field(default_factory=dict)   # run id -> what the scenario calls it
    faults: FaultLog = field(default_factory=FaultLog)
    gaps: list[Gap] = field(default_factory=list)          # hub ms when the wire was not recorded
    marks: dict[str, Mark] | None = None                   # sender -> the hub's replay mark (None: not read)
    fences: dict[str, dict[StepKey, int]] = field(default_factory=dict)  # node -> the fences its outbox holds
    settle_s: float = SETTLE_S
    # Wire index of a message the hub published -> how many journal events were committed then (the deterministic
    # simulation's broker notes it). A recording from a real broker cannot tell: it is empty, and the checks of
    # "journaled before it was sent" then judge only that the journal has it (sim/history.py, sim/delivery.py).
    committed: dict[int, int] = field(default_factory=dict)

    def ms(self, at: float) -> int:
        """A wire time in hub ms."""
        return self.epoch_ms + round(at * 1000)

    def in_gap(self, ms: int, margin_ms: int = 5_000) -> bool:
        """Whether the wire record may miss what happened at `ms` (hub clock): while the recorder was away, or
        after the record ended (the journal is read after it)."""
        return (any(gap.start_ms - margin_ms <= ms <= gap.end_ms + margin_ms for gap in self.gaps)
                or ms >= self.epoch_ms + (self.end * 1000 - margin_ms))

    def run_name(self, run_id: str) -> str:
        label = self.labels.get(run_id)
        return f"{run_id} ({label})" if label else run_id


def sender_of(topic: str) -> tuple[str, str] | None:
    """(signer, kind) from a topic: node topics are signed by the node, except commands, signed by the hub."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[3:] == ["hub", "state"]:
        return HUB_ID, "state"
    if len(parts) == 6 and parts[3] == "node":
        return (HUB_ID if parts[5] == "cmd" else parts[4]), parts[5]
    return None


def open_record(record: WireRecord, keys: dict[str, bytes]) -> Message | str:
    """The verified message a wire record carries, or why it does not verify."""
    who = sender_of(record.topic)
    if who is None or who[0] not in keys:
        return f"no key for topic {record.topic}"
    try:
        return open_envelope(record.payload, record.topic, keys[who[0]])
    except ProtocolError as exc:
        return f"{exc.reason}: {exc}"


def claimed(payload: bytes) -> Message | None:
    """What a message says, signature unchecked (what a forged message would have made the hub do)."""
    try:
        return decode_payload(cbor.loads(parse(payload).payload))
    except ProtocolError:
        return None


# -- reading the files ---------------------------------------------------------------------------------------------

def load_export(lines: Iterable[str]) -> tuple[list[Event], dict[str, Mark]]:
    """The events and replay marks of a journal export (JSON lines)."""
    events: list[Event] = []
    marks: dict[str, Mark] = {}
    for line in lines:
        if not line.strip():
            continue
        record: dict[str, Any] = json.loads(line)
        kind = record.pop("kind")
        if kind == MARK_KIND:
            marks[record["sender"]] = (int(record["boot"]), int(record["top"]), bool(record["death_seen"]))
        else:
            record.pop("seq", None)
            events.append(from_record(kind, record))
    return events, marks


@dataclass(frozen=True)
class OutboxFile:
    entries: list[OutboxEntry]        # step events and results still unacknowledged
    fences: dict[StepKey, int]        # the highest fence the agent saw per step


def read_outbox(path: Path) -> OutboxFile:
    """An agent's outbox file, read-only (the agent may still run)."""
    db = open_read_only(path)
    try:
        rows = db.execute("SELECT eid, kind, type, body, at_ms FROM entries WHERE kind = 'evt' ORDER BY eid").fetchall()
        fences = {(run, step): int(fence) for run, step, fence in db.execute("SELECT run, step, fence FROM fences")}
    except sqlite3.OperationalError:  # created but never written: no tables yet
        return OutboxFile([], {})
    finally:
        db.close()
    entries = [OutboxEntry(eid, kind, type_, cbor.loads(body, "outbox entry"), at_ms)
               for eid, kind, type_, body, at_ms in rows]
    return OutboxFile(entries, fences)


def read_outboxes(root: Path, nodes: Iterable[str]) -> dict[str, OutboxFile]:
    """Each node's outbox under `root/{node}/`; a node that never wrote one has none."""
    return outboxes_in({node: root / node for node in nodes})


def outboxes_in(data_dirs: Mapping[str, Path]) -> dict[str, OutboxFile]:
    """Each node's outbox in its agent's data directory (node -> directory); a node that never wrote one has none."""
    return {node: read_outbox(data / OUTBOX_FILE) for node, data in data_dirs.items() if (data / OUTBOX_FILE).is_file()}


def node_keys(root: Path, nodes: Iterable[str]) -> dict[str, bytes]:
    """Each node's public key, from its own key file (not from the hub's registry: the checker trusts the devices)."""
    keys = {}
    for node in nodes:
        path = public_path(root / node / KEY_FILE)
        if path.is_file():
            keys[node] = bytes.fromhex(path.read_text().strip())
    return keys
