"""One ingest worker process (`hub run --ingest-workers N`): an MQTT session on the shared subscription, where node
messages are verified and decoded, and handed to the core in batches.

    python -m hub.ingest.worker FD     (started by hub/ingest/workers.py; FD: its end of a socket pair)

The first thing on the socket is the `WorkerSpec` (broker settings, fleet, the keys the hub trusts). From then on the
worker sends batches, each the pickle of a `Batch`, and reads `keys` updates and `stop`. It does everything of
`Receiver.receive` but the replay check (`Receiver.open`), which needs the windows the core holds. It forwards
unopened what it cannot judge alone: enroll requests, and messages under a key it does not know yet (the core knows
every key it has accepted; this worker hears of a new one within a second). A refusal is counted and logged here and
its count travels with the next batch. The worker exits when its socket closes: it never outlives the hub.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pickle
import select
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as mqtt

from agent.runtime.backoff import Backoff
from agent.runtime.clock import now_ms
from agent.runtime.logs import ThrottledLog
from agent.runtime.transport import BrokerSettings, session_client_id
from protocols import Keyring, Message, ProtocolError, Receiver, envelope
from protocols.messages import BODY_TYPES, Body, Header

from .. import gc_policy
from ..intake import BACKLOG_LASTS_MS
from . import SHARE_GROUP

log = logging.getLogger("fleetflow.hub.ingest")

READ_BURST = 256      # packets read per readiness of the broker socket, at most: one batch
POLL_S = 1.0

# topic, envelope, received at (ms), kid, the opened message's header and body fields (`packed`)
OpenedItem = tuple[str, bytes, int, bytes, Header, tuple[Any, ...]]
UnopenedItem = tuple[str, bytes, int]  # topic, envelope, received at (ms)
# A body as its field values: a pickled frozen dataclass costs twice as much to load on the core's side.
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in BODY_TYPES.values()}  # type: ignore[arg-type]


def packed(body: Body) -> tuple[Any, ...]:
    return tuple([getattr(body, name) for name in _FIELDS[type(body)]])


def unpacked(header: Header, fields: tuple[Any, ...]) -> Message:
    return Message(header, BODY_TYPES[header.type](*fields))


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    fleet: str
    broker: BrokerSettings
    kinds: tuple[str, ...]
    keys: tuple[tuple[str, bytes], ...]  # (owner, public key) the hub trusts when the worker starts
    max_size: int
    log_level: int = logging.WARNING


@dataclass
class Batch:
    opened: list[OpenedItem] = field(default_factory=list)
    unopened: list[UnopenedItem] = field(default_factory=list)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    backlog_ms: int = 0          # the last time this worker's reads stayed saturated for BACKLOG_LASTS_MS (0: never)
    subscribed: bool | None = None  # True once its session's subscriptions are in, False when the session is lost

    def __bool__(self) -> bool:
        return bool(self.opened or self.unopened or self.refused or self.subscribed is not None)


def open_message(receiver: Receiver, topic: str, data: bytes, at: int) -> OpenedItem | None:
    """Every check but the replay check, or None for what only the core can judge: an enroll request (self-signed,
    for the registry), or a key this receiver does not trust (the core may). Raises `ProtocolError`."""
    if topic.endswith("/enroll"):
        return None
    kid = envelope.parse(data, receiver.max_size).kid
    if receiver.keyring.get(kid) is None:
        return None
    message = receiver.open(topic, data, at)
    return topic, data, at, kid, message.header, packed(message.body)


def share_filters(fleet: str, kinds: tuple[str, ...]) -> list[tuple[str, int]]:
    """The shared subscription: every worker in one group, so the broker hands each message to one of them."""
    return [(f"$share/{SHARE_GROUP}/fleetflow/v1/{fleet}/node/+/{kind}", 1) for kind in kinds]


class Worker:
    def __init__(self, spec: WorkerSpec, conn: Connection, clock: Callable[[], int] = now_ms) -> None:
        self.spec, self.conn, self.clock = spec, conn, clock
        self.receiver = Receiver(spec.fleet, Keyring(spec.keys), max_size=spec.max_size)
        self.batch = Batch()
        self.log = ThrottledLog(log)
        self.stopping = False
        self._saturated_since: int | None = None
        self.received = 0
        self.backoff = Backoff()
        self.client = self._client()

    # -- what arrives ----------------------------------------------------------------------------------------------

    def handle(self, topic: str, data: bytes, at: int) -> None:
        """Open one message, or forward it unopened, or count its refusal."""
        self.received += 1
        try:
            item = open_message(self.receiver, topic, data, at)
        except ProtocolError as exc:
            self.batch.refused[exc.reason] += 1
            self.log.warning(exc.reason, f"refused {exc.reason}: {topic[:120]}: {exc}")
            return
        if item is None:
            self.batch.unopened.append((topic, data, at))  # the core judges it, with every key it trusts
        else:
            self.batch.opened.append(item)

    def control(self) -> None:
        """What the core says: `("keys", added, removed kids)` or `("stop",)`; end of file: the hub is gone."""
        try:
            order = self.conn.recv()
        except (EOFError, OSError):
            self.stopping = True
            return
        if order[0] == "keys":
            for owner, key in order[1]:
                self.receiver.keyring.add(owner, key)
            for kid in order[2]:
                self.receiver.keyring.remove(kid)
        else:
            self.stopping = True

    def flush(self) -> None:
        if self.batch:
            self.conn.send_bytes(pickle.dumps(self.batch, pickle.HIGHEST_PROTOCOL))
            self.batch = Batch(backlog_ms=self.batch.backlog_ms)

    # -- the MQTT session ----------------------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        s = self.spec.broker
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, session_client_id(f"{self.spec.fleet}.ingest"),
                             clean_session=True)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.parsed()[2]:
            context = ssl.create_default_context(cafile=s.ca_file)
            if s.cert_file:
                context.load_cert_chain(s.cert_file, s.key_file)
            client.tls_set_context(context)
        client.on_message = lambda _client, _userdata, message: self.handle(message.topic, bytes(message.payload),
                                                                            self.clock())
        client.on_connect = self._connected
        client.on_subscribe = self._subscribed
        return client

    def _connected(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any) -> None:
        if reason.is_failure:
            log.warning("ingest worker %d: the broker refused the connection: %s", self.spec.index, reason)
            return
        client.subscribe(share_filters(self.spec.fleet, self.spec.kinds))

    def _subscribed(self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: Any, _properties: Any) -> None:
        refused = [r for r in reasons if r.is_failure]
        if refused:  # a broker without shared subscriptions, or an ACL without the fleet's node topics
            log.error("ingest worker %d: subscription refused (%s): the broker must allow $share/%s/... on the "
                      "fleet's node topics (docs/operations.md)", self.spec.index, refused[0], SHARE_GROUP)
            self.stopping = True
            return
        self.batch.subscribed = True
        self.backoff.reset()

    def run(self) -> None:
        host, port, _ = self.spec.broker.parsed()
        while not self.stopping:
            try:
                self.client.connect(host, port, self.spec.broker.keepalive)
            except (OSError, ValueError) as exc:
                log.warning("ingest worker %d: cannot connect to %s:%d: %s", self.spec.index, host, port, exc)
            else:
                self._serve()
                self.batch.subscribed = False
                self.flush()
            if not self.stopping:
                self._idle(self.backoff.next())  # reset once a session has its subscriptions
        self.flush()

    def _idle(self, seconds: float) -> None:
        """Wait, answering the core meanwhile."""
        if select.select([self.conn], [], [], seconds)[0]:
            self.control()

    def _serve(self) -> None:
        """Until the connection is lost or the core says stop."""
        client = self.client
        while not self.stopping:
            sock = client.socket()
            if sock is None:
                return
            readable, writable, _ = select.select([sock.fileno(), self.conn.fileno()],
                                                  [sock.fileno()] if client.want_write() else [], [], POLL_S)
            if self.conn.fileno() in readable:
                self.control()
            if sock.fileno() in readable and self._read(client) != mqtt.MQTT_ERR_SUCCESS:
                return
            if writable and client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                return
            if client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                return
            self.flush()
        client.disconnect()

    def _read(self, client: mqtt.Client) -> int:
        """Read up to READ_BURST packets, one batch. A read that leaves the socket dry ends the burst early: it
        yields no message (paho reads nothing when the socket would block)."""
        for _ in range(READ_BURST):
            before = self.received
            rc = client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return int(rc)
            if self.received == before:
                self._saturated_since = None
                return mqtt.MQTT_ERR_SUCCESS
        now = self.clock()
        if self._saturated_since is None:
            self._saturated_since = now
        elif now - self._saturated_since >= BACKLOG_LASTS_MS:
            self.batch.backlog_ms = now
        return mqtt.MQTT_ERR_SUCCESS


def main(argv: list[str] | None = None) -> None:
    fd = int((argv if argv is not None else sys.argv[1:])[0])
    # The hub stops its workers itself (and they end with its socket): a Ctrl-C or a service manager's SIGTERM to
    # the whole group must not end one first, which the hub would take for a worker that failed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc_policy.for_throughput()
    conn = Connection(fd)
    spec: WorkerSpec = conn.recv()
    logging.basicConfig(level=spec.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        Worker(spec, conn).run()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the hub is gone: nothing to hand the messages to
    finally:
        conn.close()


if __name__ == "__main__":
    # Through the package, so that what is pickled names `hub.ingest.worker`, not `__main__`.
    from hub.ingest.worker import main as run_worker

    run_worker()
