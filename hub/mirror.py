"""The JSON mirror (`hub run --json-mirror`): retained, plain JSON copies of each node's state and latest telemetry,
for platforms that cannot verify COSE (Node-RED, Telegraf, Home Assistant). docs/integrations.md documents it.

    fleetflow/v1/{fleet}/json/hub/state                 {"online", "fleet", "version", "boot"}
    fleetflow/v1/{fleet}/json/node/{node_id}/state      {"node", "liveness", "health", "labels", "profile",
                                                         "running", "draining", "version", "boot", "changed_at"}
    fleetflow/v1/{fleet}/json/node/{node_id}/telemetry  {"node", "at", "metrics": {name: number}}

Unauthenticated projections: anyone who may write to the broker can forge them, so nothing may act on them as if the
hub had said it. The hub itself never reads them: it subscribes to nothing under `json/`, and the tree lies outside
the signed one (`protocols.Topic.parse` refuses it, none of the hub's or the agents' filters match it), so what is
published here, by the hub or by anyone else, never reaches the intake. The signed messages stay the only input.

Publishing: only what changed, and per node and topic at most once per `interval` (a change inside it goes out when
the interval ends, so the last word is always published). A node removed (revoked, rejected, deleted) gets an empty
retained payload on both its topics, which clears them at the broker. Which nodes changed comes from the events the
hub applies (`applied`, like hub/eventlog.py) and the telemetry it ingests (`sampled`), plus a full comparison now and
then for a change no event names; nothing is computed on the core loop beyond adding a node id to a set.

Its own MQTT connection, not the hub's session: (1) its own Last Will, so `json/hub/state` says `online: false` when
the hub process dies (the hub's connection has one Will, its signed state); (2) republishing every node after a
reconnect never queues ahead of signed commands in the hub connection's in-flight window; (3) broker logs show it as
a client of its own (`{fleet}.mirror-...`). It logs in with the hub's credentials and subscribes to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from agent.runtime.backoff import Backoff
from agent.runtime.timeouts import within
from agent.runtime.transport import MqttTransport, Session, Transport, TransportError, Will, session_client_id
from protocols import Telemetry, check_id

from . import __version__
from .config import DEFAULT_MIRROR_INTERVAL_S

if TYPE_CHECKING:
    from .events import Event
    from .service import Hub
    from .state import Core

log = logging.getLogger("fleetflow.hub.mirror")

RESYNC_S = 30.0            # a full comparison at most this often: catches a change that no applied event names
PUBLISH_WINDOW = 100       # publishes awaited together (the client's in-flight window)
OFFLINE_TIMEOUT_S = 2.0    # for the last `online: false` on a clean stop
CLEAR: Final = b""         # an empty retained payload removes the retained message (MQTT 3.1.1, 3.3.1.3)
STATE, TELEMETRY = "state", "telemetry"


@dataclass(frozen=True)
class MirrorSettings:
    interval: float = DEFAULT_MIRROR_INTERVAL_S  # per node and topic, at most one publish per interval


@dataclass(frozen=True, slots=True)
class MirrorTopics:
    """The mirror's topic tree for one fleet; ids are checked before they reach a topic (no `/`, `+` or `#`)."""

    fleet: str

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")

    @property
    def root(self) -> str:
        return f"fleetflow/v1/{self.fleet}/json"

    @property
    def hub_state(self) -> str:
        return f"{self.root}/hub/state"

    def node(self, node_id: str, kind: str) -> str:
        return f"{self.root}/node/{check_id(node_id, 'node id')}/{kind}"

    def every_node(self, kind: str) -> str:
        """The filter a consumer subscribes to for one kind of every node."""
        return f"{self.root}/node/+/{kind}"


def _encode(value: dict[str, Any]) -> bytes:
    # Metrics are finite numbers (the wire refuses NaN and infinities), so this is strict JSON.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def state_payload(hub: Hub, node_id: str) -> bytes:
    """The node's state as the hub holds it; CLEAR for a node removed or forgotten."""
    node = hub.core.nodes.get(node_id)
    if node is None or node.removed:
        return CLEAR
    view = hub.views.get(node_id)
    return _encode({"node": node_id, "liveness": node.state, "health": node.health, "labels": dict(node.labels),
                    "profile": node.profile, "running": len(node.attempts), "draining": node.draining,
                    "version": view.version if view is not None else None, "boot": node.boot,
                    "changed_at": node.changed_at})


def telemetry_payload(hub: Hub, node_id: str) -> bytes | None:
    """The node's latest telemetry sample; CLEAR for a node removed or forgotten, None while no sample is known."""
    node = hub.core.nodes.get(node_id)
    if node is None or node.removed:
        return CLEAR
    view = hub.views.get(node_id)
    if view is None or not view.telemetry_at:
        return None  # none since the hub started: what is retained from before stays
    return _encode({"node": node_id, "at": view.telemetry_at, "metrics": dict(view.telemetry)})


def touched_nodes(core: Core, event: Event) -> Iterable[str]:
    """The nodes whose projection an applied event may have changed: the node it names, the node of the attempt it
    names, or the nodes of a run's attempts (a run cancelled or timed out ends them)."""
    node = getattr(event, "node", None)
    if node:
        return (node,)
    attempt = core.attempts.get(getattr(event, "attempt", None) or "")
    if attempt is not None:
        return (attempt.node,)
    run = core.runs.get(getattr(event, "run", None) or "")
    if run is None:
        return ()
    return {core.attempts[a].node for step in run.steps.values() for a in step.attempts if a in core.attempts}


class JsonMirror:
    """Off (`settings` None) it does nothing: the hub calls it the same way either way."""

    def __init__(self, hub: Hub, settings: MirrorSettings | None, transport: Transport | None = None) -> None:
        self.hub, self.settings = hub, settings
        self.topics = MirrorTopics(hub.config.fleet)
        self.interval = settings.interval if settings is not None else DEFAULT_MIRROR_INTERVAL_S
        # The hub's connection has the hub's intake behind it; this one needs nothing of that.
        own = hub.transport
        self.transport = transport or (MqttTransport(own.settings) if isinstance(own, MqttTransport) else own)
        self.dirty: dict[str, set[str]] = {STATE: set(), TELEMETRY: set()}  # nodes to compare, by topic kind
        self.sent: dict[tuple[str, str], bytes] = {}    # (node, kind) -> what is retained at the broker (we believe)
        self.last: dict[tuple[str, str], float] = {}    # (node, kind) -> when it was last published (loop time)
        self._swept = -math.inf
        self._wake = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    # -- the hub's side: cheap, on the core loop --------------------------------------------------------------------

    def applied(self, event: Event) -> None:
        if self.settings is None:
            return
        nodes = touched_nodes(self.hub.core, event)
        if nodes:
            self.dirty[STATE].update(nodes)
            self.dirty[TELEMETRY].update(nodes)  # a removal clears the telemetry topic too
            self._wake.set()

    def node_message(self, node_id: str, body: Any) -> None:
        """A verified message from a node: new telemetry is due out (the hub stored it in its view first)."""
        if self.settings is None or not isinstance(body, Telemetry) or node_id not in self.hub.core.nodes:
            return  # a node not born yet is asked for a birth; its NodeBorn marks it
        self.dirty[TELEMETRY].add(node_id)
        self._wake.set()

    # -- deciding what to publish -----------------------------------------------------------------------------------

    def collect(self, now: float) -> tuple[list[tuple[tuple[str, str], bytes]], float | None]:
        """What is due now, as ((node, kind), payload); and in how many seconds the next deferred change is due."""
        if now - self._swept >= RESYNC_S:
            self._swept = now
            self.mark_all()
        due: list[tuple[tuple[str, str], bytes]] = []
        wait: float | None = None
        for kind, dirty in self.dirty.items():
            for node_id in list(dirty):
                key = (node_id, kind)
                left = self.last.get(key, -math.inf) + self.interval - now
                if left > 0:
                    wait = left if wait is None else min(wait, left)
                    continue
                dirty.discard(node_id)
                payload = state_payload(self.hub, node_id) if kind == STATE else telemetry_payload(self.hub, node_id)
                if payload is None:
                    continue
                if payload == self.sent.get(key):
                    if payload == CLEAR and node_id not in self.hub.core.nodes:
                        self._forget(key)  # cleared while it was only revoked; now the hub forgot it too
                    continue
                self.last[key] = now
                due.append((key, payload))
        return due, wait

    def mark_all(self) -> None:
        """Compare every node (and every topic we hold something retained on) at the next collect."""
        nodes = set(self.hub.core.nodes) | {node for node, _ in self.sent}
        for dirty in self.dirty.values():
            dirty.update(nodes)

    def _published(self, key: tuple[str, str], payload: bytes) -> None:
        if payload == CLEAR and key[0] not in self.hub.core.nodes:
            self._forget(key)
        else:
            self.sent[key] = payload

    def _forget(self, key: tuple[str, str]) -> None:
        """A node the hub forgot (deleted), cleared at the broker: nothing of it is kept here either."""
        self.sent.pop(key, None)
        self.last.pop(key, None)

    # -- the connection ---------------------------------------------------------------------------------------------

    def _hub_state(self, online: bool) -> bytes:
        return _encode({"online": online, "fleet": self.hub.config.fleet, "version": __version__,
                        "boot": self.hub.signer.boot})

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until `stop`; a lost broker is retried with backoff (the hub's own session does the same)."""
        if self.settings is None:
            return
        backoff = Backoff()
        while not stop.is_set():
            will = Will(self.topics.hub_state, self._hub_state(False), 1, True)
            try:
                async with self.transport.connect(session_client_id(f"{self.hub.config.fleet}.mirror"),
                                                  will) as session:
                    backoff.reset()
                    await self._serve(session, stop)
            except* TransportError as group:
                log.warning("JSON mirror: broker connection: %s", group.exceptions[0])
            except* Exception:  # a bug of ours: logged, and the mirror starts over rather than going quiet for good
                log.exception("JSON mirror: unexpected error; it reconnects and publishes everything again")
            if stop.is_set():
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await within(backoff.next(), stop.wait())

    async def _serve(self, session: Session, stop: asyncio.Event) -> None:
        await session.publish(self.topics.hub_state, self._hub_state(True), qos=1, retain=True)
        # What the broker retains may be gone (restarted without persistence) or older than us: publish it all again.
        self.sent.clear()
        self.last.clear()
        self.mark_all()
        log.info("JSON mirror publishing under %s/ (unauthenticated copies, at most one per node and topic every "
                 "%g s)", self.topics.root, self.interval)
        loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(stop.wait())
        closed = asyncio.create_task(session.closed())
        try:
            while not stop.is_set():
                self._wake.clear()
                due, wait = self.collect(loop.time())
                if due:
                    await self._publish(session, due)
                    continue  # more may have changed while we waited for the broker
                woken = asyncio.create_task(self._wake.wait())
                timeout = min(wait if wait is not None else RESYNC_S, RESYNC_S)
                done, _ = await asyncio.wait({woken, stopping, closed}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if closed in done:
                    closed.result()  # raises the transport error
                    return
        finally:
            stopping.cancel()
            closed.cancel()
            # Also when the hub cancels this task as it stops: a clean disconnect sends no Will, so say it here.
            with contextlib.suppress(TransportError, asyncio.TimeoutError):
                await within(OFFLINE_TIMEOUT_S, session.publish(self.topics.hub_state, self._hub_state(False), qos=1,
                                                                retain=True))

    async def _publish(self, session: Session, due: list[tuple[tuple[str, str], bytes]]) -> None:
        for start in range(0, len(due), PUBLISH_WINDOW):
            chunk = due[start:start + PUBLISH_WINDOW]
            results = await asyncio.gather(*(session.publish(self.topics.node(node, kind), payload, qos=1, retain=True)
                                             for (node, kind), payload in chunk), return_exceptions=True)
            for (key, payload), result in zip(chunk, results):
                if isinstance(result, BaseException):
                    raise result  # the session is lost; the next one publishes everything again
                self._published(key, payload)
