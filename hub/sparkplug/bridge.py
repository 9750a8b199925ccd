"""The Sparkplug bridge's I/O shell around the pure `EdgeNode` (edge.py): its own MQTT connection, whose Will is the
NDEATH, so the Sparkplug session lives and dies by the specification's rules whatever the fleetflow session does; the
bdSeq file; the views of fleetflow nodes it feeds the edge node; the drain actions DCMDs ask for; metrics and logs.

A host's command the bridge acts on (a DCMD drain or undrain, an NCMD rebirth) is an operator action like one through
the API, and is audited like one (hub/audit.py): who is `sparkplug` (`sparkplug:HOST` with a primary host), since the
broker login that may publish on the command topics is the only authentication a Sparkplug message has; from where is
`mqtt:` and the topic it came on. Refused commands are counted, not audited.

The hub calls `applied(events)` after each batch it applied and `node_message(node, body)` for each verified node
message; both only mark nodes to look at again. The bridge's own task reads those nodes from the core and publishes,
so the core loop never waits on this broker connection. Every publish goes through one queue, in the order the edge
node numbered them: a rebirth answered by the reader can never interleave with data from the writer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Enum, Gauge

from agent.runtime.backoff import Backoff
from agent.runtime.logs import ThrottledLog
from agent.runtime.transport import MqttTransport, Session, TransportError, Will, session_client_id
from protocols import Telemetry

from .. import __version__
from ..audit import AuditError, AuditLog, Record
from ..errors import OperatorError, Unavailable
from ..events import AttemptLost, Event
from ..tokens import OPERATOR
from agent.runtime.storage import write_private
from agent.runtime.timeouts import within
from .codec import REASONS, finite
from .edge import (BORN, CLOSING, OFFLINE, WAITING, DeviceView, DrainRequest, EdgeConfig, EdgeNode, Output, Publish,
                   next_bd_seq)
from .settings import NoBridge, SparkplugSettings

if TYPE_CHECKING:
    from ..service import Hub
    from ..state import Node

log = logging.getLogger("fleetflow.hub.sparkplug")

BD_SEQ_FILE = "sparkplug.json"
ALIVE = frozenset({"online", "suspected"})
FLEET_EVERY_S = 1.0     # the Edge Node's own metrics (node counts, runs, queue) are read from the core this often
RESYNC_EVERY_S = 60.0   # and every device is compared again: a safety net for a change no event names
GOODBYE_S = 2.0         # a stopping hub waits this long at most for its NDEATH to reach the broker
ACTION_TIMEOUT_S = 10.0
AUDIT_WHO = "sparkplug"
DONE = 200  # the status an action that was done is audited with, as the API would answer it


class BdSeqFile:
    """The last bdSeq used, in the data directory: a new CONNECT (in this process or after a restart) always carries
    the next one. Written durably before the CONNECT, so no two sessions ever share a bdSeq, even across a crash."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def last(self) -> int | None:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("sparkplug: %s is unreadable (%s): bdSeq starts again at 0", self.path, exc)
            return None
        value = doc.get("bdSeq") if isinstance(doc, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            log.warning("sparkplug: %s holds no bdSeq in 0..255: bdSeq starts again at 0", self.path)
            return None
        return value

    def next(self) -> int:
        value = next_bd_seq(self.last())
        write_private(self.path, json.dumps({"bdSeq": value}).encode() + b"\n")
        return value


class SparkplugBridge(NoBridge):
    def __init__(self, hub: Hub, settings: SparkplugSettings) -> None:
        config = hub.config
        self.hub = hub
        self.edge = EdgeNode(EdgeConfig(settings.group, settings.node_id or config.fleet, settings.host,
                                        dict(settings.deadband), settings.commands))
        self.transport = MqttTransport(config.broker_settings())
        self.bd_seq = BdSeqFile(Path(config.data) / BD_SEQ_FILE)
        self.audit = AuditLog(Path(config.data), lambda: hub.key)  # signed with the hub's current key, as the API's
        self.who = f"{AUDIT_WHO}:{settings.host}" if settings.host is not None else AUDIT_WHO
        self.log = ThrottledLog(log)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._pending: collections.deque[Publish] = collections.deque()
        self._disconnect = False
        self._births = 0
        registry = hub.metrics.registry
        self.refused = Counter("fleetflow_sparkplug_refused", "Sparkplug NCMD, DCMD and STATE messages refused, by "
                               "reason", ["reason"], registry=registry)
        for reason in REASONS:
            self.refused.labels(reason)
        self.sent = Counter("fleetflow_sparkplug_messages", "Sparkplug messages published, by type", ["type"],
                            registry=registry)
        self.session = Enum("fleetflow_sparkplug_session", "The Sparkplug session: offline, waiting (for the primary "
                            "host), born, closing", states=[OFFLINE, WAITING, BORN, CLOSING], registry=registry)
        self.bd_seq_now = Gauge("fleetflow_sparkplug_bdseq", "bdSeq of the current (or last) Sparkplug session",
                                registry=registry)

    # -- fed by the hub (its core loop; never blocks) ---------------------------------------------------------------

    def applied(self, event: Event) -> None:
        """An event the hub just applied: the node it names is looked at again."""
        node = getattr(event, "node", None)
        if node is None and isinstance(event, AttemptLost):
            attempt = self.hub.core.attempts.get(event.attempt)
            node = attempt.node if attempt is not None else None
        if isinstance(node, str) and node:
            self._dirty.add(node)
            self._wake.set()

    def node_message(self, node: str, body: Any) -> None:
        """A verified message from a node: its telemetry (new figures; the hub's view holds them already)."""
        if isinstance(body, Telemetry):
            self._dirty.add(node)
            self._wake.set()

    # -- the session -----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled (the hub stopping): reconnect with backoff, a new bdSeq on every CONNECT."""
        backoff = Backoff()
        while True:
            try:
                await self._session(backoff)
            except TransportError as exc:
                log.warning("sparkplug: broker connection: %s", exc)
            except OSError as exc:  # never connect with a bdSeq that was not recorded: it could be used twice
                log.error("sparkplug: cannot record the next bdSeq in %s: %s", self.bd_seq.path, exc)
            except Exception:  # a bug of ours: logged, and a new session; the hub itself goes on either way
                log.exception("sparkplug: bridge error; starting a new session")
            await asyncio.sleep(backoff.next())

    async def _session(self, backoff: Backoff) -> None:
        bd_seq = self.bd_seq.next()
        will = self.edge.will(bd_seq, self.hub.clock())
        client_id = session_client_id(f"{self.hub.config.fleet}.sparkplug")
        async with self.transport.connect(client_id, Will(will.topic, will.payload, will.qos, will.retain)) as session:
            backoff.reset()
            self.bd_seq_now.set(bd_seq)
            self._pending.clear()
            self._disconnect = False
            self._births = 0  # NBIRTHs in this session: the first one, then rebirths
            try:
                for topic in self.edge.subscriptions():
                    await session.subscribe(topic, qos=1)
                now = self.hub.clock()
                self._emit(self.edge.update_node(self._fleet_values(), now))
                self._sync(now, every=True)  # births carry every device as it is now
                self._emit(self.edge.connected(bd_seq, now))
                if self.edge.state == WAITING:
                    log.info("sparkplug: connected as %s (bdSeq %d); births wait for primary host %s to be online",
                             self.edge.topic("N*"), bd_seq, self.edge.config.host)
                await self._serve(session)
            except asyncio.CancelledError:
                # The hub is stopping: a Sparkplug edge node that disconnects on purpose publishes its NDEATH first.
                self._pending.clear()
                self._emit(self.edge.closing(self.hub.clock()))
                with contextlib.suppress(TransportError, asyncio.TimeoutError):
                    await within(GOODBYE_S, self._drain(session))
                raise
            finally:
                self.edge.disconnected()
                self.session.state(OFFLINE)

    async def _serve(self, session: Session) -> None:
        reader = asyncio.create_task(self._read(session), name="sparkplug-reader")
        fleet_at = resync_at = self.hub.clock()
        try:
            while True:
                await self._drain(session)
                if self._disconnect:
                    log.warning("sparkplug: primary host %s is offline: NDEATH published, connecting again",
                                self.edge.config.host)
                    return
                if reader.done():
                    reader.result()  # the connection was lost: its TransportError
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(FLEET_EVERY_S, self._wake.wait())
                self._wake.clear()
                now = self.hub.clock()
                self._sync(now, every=now >= resync_at)
                if now >= resync_at:
                    resync_at = now + int(RESYNC_EVERY_S * 1000)
                if now >= fleet_at:
                    self._emit(self.edge.update_node(self._fleet_values(), now))
                    fleet_at = now + int(FLEET_EVERY_S * 1000)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, session: Session) -> None:
        try:
            async for topic, payload in session.messages():
                out = self.edge.received(topic, payload, self.hub.clock())
                self._emit(out)
                self._wake.set()
                if out.rebirth:
                    await self._record("sparkplug.rebirth", self.edge.config.node_id, topic, DONE, {})
                for request in out.actions:
                    await self._drain_node(request, topic)
                await asyncio.sleep(0)  # a flood of commands takes turns with the hub's own work on the loop
        finally:
            self._wake.set()  # the writer notices a lost connection at once

    async def _drain(self, session: Session) -> None:
        """Publish what the edge node produced, in its order (the order of its seq numbers)."""
        while self._pending:
            message = self._pending.popleft()
            await session.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            self.sent.labels(message.kind).inc()

    def _emit(self, out: Output) -> None:
        self._pending.extend(out.publish)
        self._disconnect = self._disconnect or out.disconnect
        if any(message.kind == "NBIRTH" for message in out.publish):
            self._births += 1
            log.info("sparkplug: edge node %s born%s (bdSeq %s): NBIRTH and %d DBIRTH(s)", self.edge.topic("N*"),
                     " again" if self._births > 1 else "", self.edge.bd_seq,
                     sum(1 for message in out.publish if message.kind == "DBIRTH"))
        for refusal in out.refused:
            self.refused.labels(refusal.reason).inc()
            self.log.warning(f"sparkplug-{refusal.reason}", f"sparkplug: refused ({refusal.reason}): {refusal.detail}")
        self.session.state(self.edge.state)

    # -- what the hub holds, as the edge node sees it ----------------------------------------------------------------

    def _sync(self, now: int, every: bool = False) -> None:
        """Give the edge node the current view of the nodes marked since the last time (or of every node)."""
        names = set(self.hub.core.nodes) | set(self.edge.devices) if every else self._dirty
        self._dirty = set()
        for node_id in sorted(names):
            node = self.hub.core.nodes.get(node_id)
            if node is None:
                self._emit(self.edge.remove_device(node_id, now))
            else:
                self._emit(self.edge.update_device(self._view(node), now))

    def _view(self, node: Node) -> DeviceView:
        seen = self.hub.views.get(node.id)  # .get: the views are a defaultdict, and reading must not add to it
        telemetry = seen.telemetry if seen is not None else {}
        labels = dict(node.labels)
        values = {"cpu": finite(telemetry.get("cpu")), "mem": finite(telemetry.get("mem")),
                  "disk": finite(telemetry.get("disk")), "temp": finite(telemetry.get("temp")),
                  "liveness": node.state, "health": node.health, "running": len(node.attempts),
                  "drain": node.draining, "version": seen.version if seen is not None else None, "profile": node.profile or None,
                  "labels": ",".join(f"{key}={value}" for key, value in sorted(labels.items()))}
        return DeviceView(node.id, node.state in ALIVE and not node.removed, node.boot, values, labels)

    def _fleet_values(self) -> dict[str, Any]:
        core = self.hub.core
        states = collections.Counter(str(node.state) for node in core.nodes.values())
        return {"hub_version": __version__, "fleet": self.hub.config.fleet, "nodes_online": states["online"],
                "nodes_suspected": states["suspected"], "nodes_failed": states["failed"],
                "nodes_offline": states["offline"], "runs_active": len(core.active), "steps_queued": len(core.queue)}

    async def _drain_node(self, request: DrainRequest, topic: str) -> None:
        """A DCMD's Device Control/Drain: the same action as `fleetflow nodes drain` (journaled, sent to the node),
        audited as `node.drain` with the status it ended in; the DDATA that reports it follows from the event, like
        any other change."""
        log.info("sparkplug: DCMD Device Control/Drain=%s for node %s", str(request.on).lower(), request.node)
        status = DONE
        params: dict[str, Any] = {"on": request.on}
        try:
            await within(ACTION_TIMEOUT_S, self.hub.node_action(request.node, "drain", request.on))
        except OperatorError as exc:
            log.warning("sparkplug: DCMD drain of node %s not done: %s", request.node, exc)
            status, params["error"] = exc.status, str(exc)
        except asyncio.TimeoutError:
            log.warning("sparkplug: DCMD drain of node %s not done within %g s", request.node, ACTION_TIMEOUT_S)
            status, params["error"] = Unavailable.status, f"not done within {ACTION_TIMEOUT_S:g} s"
        await self._record("node.drain", request.node, topic, status, params)

    async def _record(self, action: str, target: str, topic: str, status: int, params: dict[str, Any]) -> None:
        """Audit a host's command the bridge acted on. The entry is fsync'd: in a worker thread, as the API's are, so
        the event loop (the core loop's too) never waits on the disk; this reader does, one command at a time."""
        record = Record(self.hub.clock(), self.who, OPERATOR, action, target, f"mqtt:{topic}", status, params)
        try:
            await self.audit.write(record)
        except (OSError, AuditError) as exc:  # the action stands either way, as through the API
            log.error("audit log: cannot record %s %s by %s: %s", action, target, self.who, exc)
