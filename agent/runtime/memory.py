"""An in-memory MQTT broker and transport: the real hub and agents in one process, no sockets (sim/dst.py).

`MemoryBroker` keeps the MQTT 3.1.1 semantics this project relies on:

- topic filters with `+` and `#` (`a/#` also matches `a`; a wildcard first level never matches a `$` topic);
- QoS 0 and 1, delivered at min(publish QoS, subscription QoS); a client with overlapping subscriptions gets one
  copy, at the highest QoS granted; a QoS 1 message may arrive twice (a redelivery) when the `Network` says so;
- retained messages: a new subscription gets the last retained message of each matching topic; a retained publish
  with an empty payload clears the topic (current subscribers still get it, as the standard says);
- the Last Will, published when a connection ends without DISCONNECT (`MemoryTransport.abort()`, a crash, a cut link
  noticed at keepalive, a second connection with the same client id), never on a clean disconnect;
- ordering: what one client publishes reaches a subscriber in publish order; delays are per (publisher, subscriber)
  link, so messages of different publishers may overtake each other;
- persistent sessions (clean_session=False): subscriptions, and QoS 1 messages that arrive while the client is away,
  wait for its next connection with that client id. Our clients use clean sessions (a fresh client id per session),
  so this is only here to keep the broker honest; it costs a few lines.

Every delivery goes through a `Network`, which a simulation drives from a seeded `random.Random`: loss (QoS 0 only,
or anything crossing a cut link), duplication (QoS 1), delay, reordering across publishers, partitions. Time is the
event loop's, so under sim/virtual_time.py delays cost no wall time. `wire` and `deliveries` log everything the broker
carried, for checkers that judge from the wire.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from protocols.topics import filter_matches

from .transport import Session, TransportError, Will

BROKER: Final = "$broker"  # the sender of retained copies: a link of its own, ordered like any other


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message as a subscriber gets it; `topic` and `payload` as on an aiomqtt message, so the hub's intake (which
    an `incoming` queue may be) reads it unchanged."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class WireRecord:
    """One PUBLISH a client made (or the broker made for it: a Will)."""

    at: float       # loop time, s
    sender: str     # the publishing transport's name
    topic: str
    payload: bytes
    qos: int
    retain: bool
    will: bool      # the broker published it as the sender's Last Will
    reached: bool   # False: lost on its way to the broker (the sender's link was cut)
    seq: int = 0    # position among everything the broker logged (wire records and deliveries): causal order


@dataclass(frozen=True, slots=True)
class Delivery:
    at: float
    receiver: str   # the receiving transport's name
    message: int    # index into `MemoryBroker.wire`
    duplicate: bool
    seq: int = 0


@dataclass
class Faults:
    """What the network does to each delivery, as chances in [0, 1] and seconds."""

    loss: float = 0.0       # a QoS 0 delivery is dropped
    duplicate: float = 0.0  # a QoS 1 delivery arrives a second time
    delay: float = 0.0      # each delivery takes uniform(0, delay) s
    reorder: float = 0.0    # a delivery is held back `hold` s more: later messages of other publishers overtake it
    hold: float = 1.0


class Network:
    """The fate of every delivery, drawn from one seeded `random.Random` (a perfect network by default), and the set
    of cut links (by transport name)."""

    def __init__(self, rng: random.Random | None = None, faults: Faults | None = None) -> None:
        self.rng = rng or random.Random(0)
        self.faults = faults or Faults()
        self._cut: dict[str, None] = {}  # a dict, not a set: iteration order must not depend on string hashing

    def cut(self, name: str) -> None:
        self._cut[name] = None

    def heal(self, name: str) -> None:
        self._cut.pop(name, None)

    def is_cut(self, name: str) -> bool:
        return name in self._cut

    def copies(self, qos: int) -> list[float]:
        """Delays after which the receiver gets a delivery: none (lost), one, or two (a QoS 1 redelivery)."""
        f, rng = self.faults, self.rng
        if qos == 0 and f.loss and rng.random() < f.loss:
            return []
        copies = 2 if qos > 0 and f.duplicate and rng.random() < f.duplicate else 1
        delays = []
        for _ in range(copies):
            delay = rng.uniform(0.0, f.delay) if f.delay else 0.0
            if f.reorder and rng.random() < f.reorder:
                delay += f.hold
            delays.append(delay)
        return delays


def check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"invalid topic name {topic!r}")


def check_filter(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    if not topic_filter or "\0" in topic_filter:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise ValueError(f"invalid topic filter {topic_filter!r}: a wildcard must fill its level, # must be last")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """The protocol's filter matching, plus the broker's rule for `$` topics (MQTT 3.1.1, 4.7.2)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    return filter_matches(topic_filter, topic)


_END: Final = object()  # closes a connection's own message queue


@dataclass(eq=False)
class _Connection:
    serial: int
    client_id: str
    name: str
    will: Will | None
    clean_session: bool
    queue: Any                     # where deliveries go: its own asyncio.Queue, or the transport's `incoming` queue
    own_queue: bool
    max_queued: int
    subscriptions: dict[str, int] = field(default_factory=dict)
    state: str = "open"            # open, closed (DISCONNECT), lost (no DISCONNECT: the Will fired)
    reason: str = ""
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def granted(self, topic: str) -> int | None:
        """The highest QoS of this client's subscriptions matching `topic` (None: no match)."""
        best = None
        for topic_filter, qos in self.subscriptions.items():
            if topic_matches(topic_filter, topic) and (best is None or qos > best):
                best = qos
        return best

    def check_open(self) -> None:
        if self.state != "open":
            raise TransportError(f"connection {self.reason or self.state}")

    def receive(self, message: Delivered) -> bool:
        if self.own_queue and self.queue.qsize() >= self.max_queued:
            return False  # as a client library with a full queue: dropped
        self.queue.put_nowait(message)
        return True


@dataclass
class _Stored:
    """A persistent session while its client is away."""

    subscriptions: dict[str, int]
    queued: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)  # (wire index, qos)


@dataclass
class _Link:
    last: float = 0.0  # delivery time of the newest message queued: later ones never arrive before it
    queue: collections.deque[tuple[_Connection, Delivered, int]] = field(default_factory=collections.deque)


class MemoryBroker:
    def __init__(self, network: Network | None = None) -> None:
        self.network = network or Network()
        self.wire: list[WireRecord] = []
        self.deliveries: list[Delivery] = []
        self._connections: dict[str, _Connection] = {}  # by client id, in connection order
        self._retained: dict[str, int] = {}              # topic -> wire index
        self._stored: dict[str, _Stored] = {}
        self._links: dict[tuple[str, int], _Link] = {}
        self._serial = 0
        self.logged = 0  # wire records and deliveries so far (their `seq`)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    # -- connections -----------------------------------------------------------------------------------------------

    def open(self, name: str, client_id: str, will: Will | None, clean_session: bool, queue: Any,
             own_queue: bool, max_queued: int) -> _Connection:
        if self.network.is_cut(name):
            raise TransportError(f"cannot connect {client_id}: the network to the broker is cut")
        old = self._connections.get(client_id)
        if old is not None:  # [MQTT-3.1.4-2]: the server disconnects the existing client, here without DISCONNECT
            self.close(old, lost=True, reason="taken over by a newer connection with the same client id")
        self._serial += 1
        conn = _Connection(self._serial, client_id, name, will, clean_session, queue, own_queue, max_queued)
        self._connections[client_id] = conn
        stored = self._stored.pop(client_id, None)
        if stored is not None and not clean_session:
            conn.subscriptions = stored.subscriptions
            for index, qos in stored.queued:
                self._send(BROKER, conn, index, qos, retain=False)
        return conn

    def close(self, conn: _Connection, lost: bool, reason: str) -> None:
        """End a connection: with DISCONNECT (`lost=False`), or without, and then the broker publishes its Will."""
        if conn.state != "open":
            return
        if self._connections.get(conn.client_id) is conn:
            del self._connections[conn.client_id]
        conn.state, conn.reason = ("lost" if lost else "closed"), reason
        conn.ended.set()
        if conn.own_queue:
            conn.queue.put_nowait(_END)
        if not conn.clean_session:
            self._stored[conn.client_id] = _Stored(dict(conn.subscriptions))
        if lost and conn.will is not None:
            will = conn.will
            self._carry(conn.name, will.topic, will.payload, will.qos, will.retain, will=True)

    def partition(self, name: str, notice_after: float) -> None:
        """Cut the link of every connection of transport `name`: nothing passes either way, new connections are
        refused, and after `notice_after` s (the keepalive) the broker drops the connections it had, Wills and all."""
        self.network.cut(name)
        doomed = [c for c in self._connections.values() if c.name == name]
        asyncio.get_running_loop().call_later(notice_after, self._notice, doomed)

    def heal(self, name: str) -> None:
        self.network.heal(name)

    def _notice(self, doomed: list[_Connection]) -> None:
        for conn in doomed:
            self.close(conn, lost=True, reason="lost: no answer within the keepalive")

    # -- messages --------------------------------------------------------------------------------------------------

    def publish(self, conn: _Connection, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        conn.check_open()
        check_topic(topic)
        if self.network.is_cut(conn.name):  # gone with the connection's dead link
            self.logged += 1
            self.wire.append(WireRecord(self._now(), conn.name, topic, payload, min(qos, 1), retain, False, False,
                                        self.logged))
            return
        self._carry(conn.name, topic, payload, min(qos, 1), retain)

    def subscribe(self, conn: _Connection, topic_filter: str, qos: int) -> None:
        conn.check_open()
        check_filter(topic_filter)
        conn.subscriptions[topic_filter] = min(qos, 1)
        for topic, index in self._retained.items():  # [MQTT-3.3.1-6]: retained messages go to every new subscription
            if topic_matches(topic_filter, topic):
                self._send(BROKER, conn, index, min(self.wire[index].qos, qos, 1), retain=True)

    def _carry(self, sender: str, topic: str, payload: bytes, qos: int, retain: bool, will: bool = False) -> None:
        index = len(self.wire)
        self.logged += 1
        self.wire.append(WireRecord(self._now(), sender, topic, payload, qos, retain, will, True, self.logged))
        if retain:
            if payload:
                self._retained[topic] = index
            else:
                self._retained.pop(topic, None)  # [MQTT-3.3.1-10]: an empty retained message clears the topic
        for conn in list(self._connections.values()):
            granted = conn.granted(topic)
            if granted is not None:
                self._send(sender, conn, index, min(qos, granted), retain=False)
        for stored in self._stored.values():
            granted = max((q for f, q in stored.subscriptions.items() if topic_matches(f, topic)), default=None)
            if granted is not None and min(qos, granted) > 0:
                stored.queued.append((index, min(qos, granted)))

    def _send(self, sender: str, conn: _Connection, index: int, qos: int, retain: bool) -> None:
        record = self.wire[index]
        loop = asyncio.get_running_loop()
        key = (sender, conn.serial)
        for copy, delay in enumerate(self.network.copies(qos)):
            link = self._links.get(key)
            if link is None:
                link = self._links[key] = _Link()
            at = max(loop.time() + delay, link.last)
            link.last = at
            link.queue.append((conn, Delivered(record.topic, record.payload, qos, retain, copy > 0), index))
            # Each timer delivers the head of its link, whichever timer fires first: equal times keep the order.
            loop.call_at(at, self._deliver_next, key)

    def _deliver_next(self, key: tuple[str, int]) -> None:
        link = self._links[key]
        conn, message, index = link.queue.popleft()
        if not link.queue:
            del self._links[key]
        if conn.state != "open":
            stored = self._stored.get(conn.client_id)
            if stored is not None and message.qos > 0 and conn.client_id not in self._connections:
                stored.queued.append((index, message.qos))
            return  # a clean session's messages end with it
        if self.network.is_cut(conn.name):
            return  # lost on the cut link
        if conn.receive(message):
            self.logged += 1
            self.deliveries.append(Delivery(self._now(), conn.name, index, message.duplicate, self.logged))


class _MemorySession:
    def __init__(self, broker: MemoryBroker, conn: _Connection) -> None:
        self._broker, self._conn = broker, conn

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self._conn.check_open()
        await asyncio.sleep(0)  # a publish takes a turn of the loop, as a socket write does
        self._broker.publish(self._conn, topic, payload, qos, retain)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._conn.check_open()
        await asyncio.sleep(0)
        self._broker.subscribe(self._conn, topic_filter, qos)

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        conn = self._conn
        if not conn.own_queue:
            raise TypeError("this session delivers to its transport's `incoming` queue")
        while True:
            item = await conn.queue.get()
            if item is _END:
                conn.queue.put_nowait(_END)  # for any later reader
                if conn.state == "lost":
                    raise TransportError(f"connection {conn.reason}")
                return
            yield item.topic, item.payload

    async def closed(self) -> None:
        await self._conn.ended.wait()
        if self._conn.state == "lost":
            raise TransportError(f"connection {self._conn.reason}")


class MemoryTransport:
    """A `Transport` to a `MemoryBroker`. `name` identifies the client across its sessions (partitions and the wire
    log use it; client ids change every session). `incoming`, as on MqttTransport, makes the queue received messages
    go to (called with `maxsize=`): the hub passes its intake."""

    def __init__(self, broker: MemoryBroker, name: str, incoming: Callable[..., Any] | None = None,
                 clean_session: bool = True, max_queued: int = 10_000) -> None:
        self.broker, self.name, self.incoming = broker, name, incoming
        self.clean_session, self.max_queued = clean_session, max_queued
        self._open: dict[int, _Connection] = {}

    def abort(self) -> None:
        """Drop every connection like a power cut: no DISCONNECT, so the broker publishes the Wills."""
        for conn in list(self._open.values()):
            self.broker.close(conn, lost=True, reason="reset by the client (no DISCONNECT)")

    @contextlib.asynccontextmanager
    async def connect(self, client_id: str, will: Will | None) -> AsyncIterator[Session]:
        await asyncio.sleep(0)
        own = self.incoming is None
        queue = asyncio.Queue() if own else self.incoming(maxsize=self.max_queued)  # type: ignore[misc]
        conn = self.broker.open(self.name, client_id, will, self.clean_session, queue, own, self.max_queued)
        self._open[conn.serial] = conn
        try:
            yield _MemorySession(self.broker, conn)
        finally:
            del self._open[conn.serial]
            self.broker.close(conn, lost=False, reason="closed")  # DISCONNECT, as MqttTransport does on exit
