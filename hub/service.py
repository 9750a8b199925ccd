"""The hub process: MQTT session, enrollment, and the write-ahead core loop around the pure `Core`.

Loop: take a batch of inbound messages and operator requests, turn them into facts, make them durable (one group
commit), apply them, ask the core for decisions, make those durable and apply them, and only then send what the
events call for (assignments, cancels, acks). A crash at any point loses nothing the hub acted on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey
from tinydb import TinyDB

from agent.identity import DurableJSONStorage
from agent.node import Backoff
from agent.startup import DataLock, broker_unreachable
from agent.telemetry import now_ms
from agent.transport import (BrokerSettings, MqttTransport, Session, Transport, TransportError, Will,
                             session_client_id)
from protocols import (HUB_ID, Ack, Assign, AttemptRef, Birth, Cancel, Config, Death, Drain, Enroll, Heartbeat,
                       Keyring, ProtocolError, ReplayWindow, Signer, StepEvent, StepResult, Telemetry)
from protocols.envelope import DEFAULT_MAX_SIZE

from . import __version__
from .eventlog import apply_logged
from .clones import CloneWatch, report_conflicts
from .events import (ActionTaken, Event, HealthChanged, HubLoadChanged, NodeBorn, NodeDied, NodeSeen,
                     ResultReported, RunCancelRequested, RunSubmitted, StepReported)
from .health import HealthTracker, LoadMonitor, Policy
from .intake import Inbound, Intake
from .journal import Journal, Mark
from .keys import ApiTokens, HubKeys, ensure_token, follow_rotation
from .limits import Limits
from .metrics import HubMetrics
from .mirror import JsonMirror, MirrorSettings
from .node_admin import NodeAdmin, reset_stale_windows
from .registry import DEFAULT_MAX_PENDING, DEFAULT_TOKEN_USES, Registry
from .runnable import workflow_problems
from .sparkplug import NoBridge, SparkplugSettings, bridge_for
from .state import Command, Core, SendAssign, SendCancel, SendConfig, SendDrain, compile_workflow
from .workflow import Workflow, WorkflowError

log = logging.getLogger("fleetflow.hub")

DEFAULT_RUN_DEADLINE_S = 24 * 3600  # every run ends: one without a timeout gets this deadline
COMMAND_TTL_MS = 60_000
TICK_S = 0.1
TIMER_SCAN_S = 0.1  # liveness, timeouts and breakers are scanned at most this often; placement after every batch
BATCH = 2000
READ_BURST = 256      # packets read per readiness of the broker socket
# The hub is behind, and decides no liveness, while a message has waited BEHIND_MS in the intake, for
# BACKLOG_GRACE_MS after a socket read ended with more waiting, and for SHED_GRACE_MS after the intake's queues were
# full (a sender over its own quota does not count: see hub/intake.py).
BEHIND_MS = 2000
BACKLOG_GRACE_MS = 1000
SHED_GRACE_MS = 5000
REBIRTH_EVERY_MS = 5000  # a live node the hub does not hold online is asked for a birth at most this often
NODE_KINDS_READ = ("enroll", "birth", "death", "hb", "tel", "evt")  # never `cmd`: our own commands


@dataclass
class HubConfig:
    broker: str
    fleet: str
    data: Path
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    auto_accept: bool = False
    enroll_token: str | None = None
    enroll_token_uses: int = DEFAULT_TOKEN_USES  # enrollments one enroll token may admit, counted durably
    max_pending: int = DEFAULT_MAX_PENDING       # pending enroll requests kept; the oldest is dropped beyond
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    snapshot_every: int = 10_000
    policy: Policy = field(default_factory=Policy)
    limits: Limits = field(default_factory=Limits)  # request bodies and workflows (hub/limits.py)
    cert_file: str | None = None  # client certificate and key, for a broker that requires them (mutual TLS)
    key_file: str | None = None
    sparkplug: SparkplugSettings | None = None  # a Sparkplug B edge node with its own MQTT session (hub/sparkplug/)
    json_mirror: MirrorSettings | None = None  # retained JSON copies for platforms without COSE (hub/mirror.py)
    node_metrics: int = 0  # per-node telemetry gauges for at most this many nodes; 0: none (hub/metrics.py)


class OperatorError(Exception):
    """An operator request that cannot be done; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    facts: list[Event]
    future: asyncio.Future[Any]
    result: Any = None


@dataclass
class _BatchOut:
    """What ingesting a batch calls for besides facts: acks, replies, the senders whose replay marks moved (made
    durable with the batch), and the nodes born in it (their births are not applied to the core yet)."""

    acks: dict[str, list[int]] = field(default_factory=lambda: collections.defaultdict(list))
    replies: list[tuple[str, Any]] = field(default_factory=list)
    senders: set[str] = field(default_factory=set)
    born: set[str] = field(default_factory=set)


@dataclass
class NodeView:
    """What the hub knows of a node beyond the journal: latest heartbeat and telemetry (not journaled)."""

    heartbeat: Heartbeat | None = None
    telemetry: dict[str, float] = field(default_factory=dict)
    telemetry_at: int = 0       # when `telemetry` was sampled, ms (0: no sample since the hub started)
    version: str | None = None  # the agent's version, from its latest birth


class Hub:
    def __init__(self, config: HubConfig, transport: Transport | None = None) -> None:
        self.config = config
        data = Path(config.data)
        # Before anything in the directory is read or changed: one hub per data directory (agent/startup.py).
        self.lock = DataLock.acquire(data)
        os.chmod(data, 0o700)
        self.keys = HubKeys.open(data, now_ms())  # hub.key, and a key rotation under way (hub/keys.py)
        self.meta = TinyDB(str(data / "hub.json"), storage=DurableJSONStorage)
        self.registry = Registry(data / "nodes.json")
        self.journal = Journal(data / "journal.sqlite", config.snapshot_every)
        self.core: Core = self.journal.load()
        self.core.policy = config.policy  # decisions already journaled keep the policy they were made under
        self.core.after_load(now_ms())
        self.tracker = HealthTracker(config.policy)
        self.load = LoadMonitor(config.policy.self_protection)
        self._profile_thresholds: dict[str, dict[str, dict[str, float]]] = {}
        self.tokens = ApiTokens(data)  # api.token, and the previous one during a rotation's overlap
        keyring = Keyring(self.registry.accepted_keys())
        # The receiver also reads what its replay check refuses: two devices with one identity (hub/clones.py).
        self.receiver = self.clones = CloneWatch(config.fleet, keyring, windows=self._restore_windows())
        boot = int((self.meta.get(doc_id=1) or {}).get("boot", 0)) + 1
        self._set_meta(boot=boot, fleet=config.fleet)
        self.signer = Signer(self.key, config.fleet, HUB_ID, boot=boot)
        self.intake = Intake(config.fleet, self.receiver, now_ms)
        self.transport = transport or MqttTransport(BrokerSettings(config.broker, config.username, config.password,
                                                                   config.ca_file, config.cert_file, config.key_file),
                                                    incoming=lambda maxsize=0: self.intake, read_burst=READ_BURST,
                                                    on_backlog=self.intake.note_backlog)
        self.metrics = HubMetrics(self)
        self.views: dict[str, NodeView] = collections.defaultdict(NodeView)
        self.mirror = JsonMirror(self, config.json_mirror)  # does nothing unless --json-mirror
        self.sparkplug = bridge_for(self, config.sparkplug)  # a NoBridge, doing nothing, unless --sparkplug
        # What follows the hub's applied events and verified node messages, on the core loop (never blocking).
        self.observers: tuple[JsonMirror | NoBridge, ...] = (self.mirror, self.sparkplug)
        self.requests: collections.deque[_Request] = collections.deque()
        self.session: Session | None = None
        self._stop = asyncio.Event()
        self._timers_at = 0.0
        self.liveness_paused = False
        self._rebirth_asked: dict[str, int] = {}
        self.api_url: str | None = None

    def _restore_windows(self) -> dict[str, ReplayWindow]:
        """Replay windows after a restart: each sender's durable high-water mark (journal table `marks`), which
        refuses everything at or below it; journals from before that table carry whole windows in the core."""
        windows = {k: ReplayWindow.from_dict(v) for k, v in self.core.windows.items()}
        for sender, (boot, top, death_seen) in self.journal.marks().items():
            old = windows.get(sender)
            if old is None or boot < 0 or (boot, top) > (old.boot, old.top):  # boot -1: reset for a new key
                windows[sender] = ReplayWindow.fenced(boot, top, death_seen)
        reset_stale_windows(self.registry, self.journal, windows)
        return windows

    # -- files ---------------------------------------------------------------------------------------------------

    _token = staticmethod(ensure_token)

    @property
    def token(self) -> str:
        return self.tokens.current

    def check_token(self, given: str) -> bool:
        return self.tokens.check(given, now_ms())

    def _set_meta(self, **fields: Any) -> None:
        table = self.meta.table("_default")
        if table.get(doc_id=1) is None:
            table.insert(fields)
        else:
            table.update(fields, doc_ids=[1])

    @property
    def key(self) -> SigningKey:
        return self.keys.current  # changes when a key rotation switches (hub/keys.py)

    @property
    def public_key(self) -> bytes:
        return self.keys.public_key

    @functools.cached_property
    def admin(self) -> NodeAdmin:
        return NodeAdmin(self)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def _listen(self) -> socket.socket:
        """Bind the API socket; an address that cannot be used is an OperatorError naming the setting."""
        from .api import bind

        host, port = self.config.api_host, self.config.api_port
        try:
            sock = bind(host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OperatorError(f"cannot listen on {host}:{port} (--api): {reason[:1].lower()}{reason[1:]}") from None
        bound_host, bound_port = sock.getsockname()[:2]
        self.api_url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
        self._set_meta(api=self.api_url)  # clients given --data find the API here
        log.info("API listening at %s", self.api_url)
        return sock

    async def run(self, api: bool = True, first_connection_required: bool = True) -> None:
        """Serve until `stop()`. A first broker connection that fails raises `StartupError` (with
        `first_connection_required`); a broker lost later is retried with backoff, forever."""
        tasks: list[asyncio.Task[None]] = []
        backoff = Backoff()
        connected = False
        try:
            if api:
                from .api import serve

                # Bound before the broker is tried: a port in use stops the start, rather than leave a hub with no API.
                tasks.append(asyncio.create_task(serve(self, self._listen()), name="api"))
            tasks.append(asyncio.create_task(self._core_loop(), name="core"))
            tasks.append(asyncio.create_task(self._monitor_load(), name="load"))
            tasks.append(asyncio.create_task(report_conflicts(self, self.clones), name="conflicts"))
            tasks.append(asyncio.create_task(self.mirror.run(self._stop), name="mirror"))
            tasks.append(asyncio.create_task(self.sparkplug.run(), name="sparkplug"))
            while not self._stop.is_set():
                offline = self.signer.seal(self.keys.state(False, __version__), now_ms())
                failure: TransportError | None = None
                try:
                    async with self.transport.connect(session_client_id(f"{self.config.fleet}.hub"),
                                                      Will(offline.topic, offline.payload, 1, True)) as session:
                        connected = True
                        backoff.reset()
                        await self._session(session)
                except* TransportError as group:
                    failure = group.exceptions[0]  # type: ignore[assignment]
                finally:
                    self.session = None
                if failure is not None:
                    if first_connection_required and not connected and not self._stop.is_set():
                        raise broker_unreachable(self.config.broker, failure)
                    log.warning("broker connection: %s", failure)
                if self._stop.is_set():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff.next())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.journal.close()
            self.registry.close()
            self.meta.close()
            self.lock.release()

    async def _session(self, session: Session) -> None:
        for kind in NODE_KINDS_READ:
            await session.subscribe(f"fleetflow/v1/{self.config.fleet}/node/+/{kind}", qos=1)
        # Every node that sees this (a newer hub state) publishes a birth: the hub may have missed births while it
        # was away, or the nodes reconnected to a restarted broker before it did.
        await self._publish_state(session, True)
        self.session = session
        log.info("hub online for fleet %s (boot %d)", self.config.fleet, self.signer.boot)
        reader = asyncio.create_task(session.closed())
        stop = asyncio.create_task(self._stop.wait())
        keys = asyncio.create_task(follow_rotation(self.keys, self.signer, lambda: self._publish_state(session, True),
                                                   now_ms))
        try:
            done, _ = await asyncio.wait({reader, stop, keys}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # raises the transport error
            elif keys in done:
                keys.result()  # a hub state it could not publish: the transport error ends the session
            else:  # a clean stop: say we are offline before leaving
                await self._publish_state(session, False)
        finally:
            for task in (reader, stop, keys):
                task.cancel()
            await asyncio.gather(reader, stop, keys, return_exceptions=True)

    async def _publish_state(self, session: Session, online: bool) -> None:
        """The retained hub state, signed with the current key; during a key rotation it announces the next one, and
        the rotation's overlap starts once the broker has taken the first announcement."""
        state = self.keys.state(online, __version__)
        out = self.signer.seal(state, now_ms())
        await session.publish(out.topic, out.payload, qos=1, retain=True)
        if online and state.next_key is not None:
            self.keys.announced(now_ms())

    # -- the core loop -------------------------------------------------------------------------------------------

    async def _core_loop(self) -> None:
        while True:
            if not self.requests:
                await self.intake.wait(TICK_S)
            batch: list[Inbound | _Request] = []
            while self.requests and len(batch) < BATCH // 4:
                batch.append(self.requests.popleft())
            batch.extend(self.intake.take(BATCH - len(batch)))
            try:
                await self._process(batch)
            except Exception:
                log.exception("core loop error (the batch is dropped; the journal holds everything applied)")
                for item in batch:
                    if isinstance(item, _Request) and not item.future.done():
                        item.future.set_exception(OperatorError("internal error", 500))
                    elif isinstance(item, Inbound):  # acknowledged to the broker: counted, never silently gone
                        self.intake.shed[(item.kind, "core-error")] += 1

    async def _process(self, batch: list[Inbound | _Request]) -> None:
        now = now_ms()
        facts: list[Event] = []
        out = _BatchOut()
        requests: list[_Request] = []
        for item in batch:
            if isinstance(item, _Request):
                facts.extend(item.facts)
                requests.append(item)
            else:
                facts.extend(self._ingest(item, out))
        marks: dict[str, Mark] = {s: self.receiver.windows[s].mark() for s in out.senders
                                  if s in self.receiver.windows}
        commands: list[Command] = []
        if facts or marks:
            started = time.perf_counter()
            await self.journal.append(facts, marks)
            self.metrics.journal_commit.observe(time.perf_counter() - started)
            for fact in facts:
                if isinstance(fact, ResultReported):
                    # run time of an accepted result, from the core's own record of when its attempt started
                    attempt = self.core.current(fact.attempt, fact.node, fact.fence)
                    if attempt is not None and attempt.started_at is not None:
                        self.metrics.step_latency.observe((fact.at - attempt.started_at) / 1000)
                commands += apply_logged(self.core, fact)
                for observer in self.observers:
                    observer.applied(fact)
                self.metrics.count_adaptation(fact)
        scan = time.monotonic() - self._timers_at >= TIMER_SCAN_S
        if scan:
            self._timers_at = time.monotonic()
        liveness = self._liveness(now_ms())
        for _ in range(5):  # decisions can enable further decisions (a loss re-queues what a placement then moves)
            decisions = self.core.decide(now_ms(), timers=scan, liveness=liveness)
            if not decisions:
                break
            await self.journal.append(decisions)
            for decision in decisions:
                commands += apply_logged(self.core, decision)
                for observer in self.observers:
                    observer.applied(decision)
                self.metrics.count_decision(decision)
        applied = now_ms()
        for item in batch:
            if not isinstance(item, _Request):
                self.metrics.ingest_lag.observe((applied - item.at) / 1000)
        self.registry.flush()  # enrollment answers go out only once the registry holds them
        for request in requests:
            if not request.future.done():
                request.future.set_result(request.result)
        await self._send(commands, out.acks, out.replies, now)
        if self.journal.snapshot_due():
            self.journal.snapshot(self.core)

    def _liveness(self, now: int) -> bool:
        """False while the hub is behind (its intake was full recently, or a message has waited too long): a silence
        that may be the hub's own is not held against any node. On catching up every node gets a fresh window."""
        oldest = self.intake.oldest_ms()
        behind = (now - self.intake.pressure_ms < SHED_GRACE_MS or (oldest is not None and now - oldest > BEHIND_MS)
                  or now - self.intake.backlog_ms < BACKLOG_GRACE_MS or self.core.overloaded)
        if behind and not self.liveness_paused:
            log.warning("hub is behind (intake full or lagging): liveness decisions suspended")
        elif not behind and self.liveness_paused:
            log.warning("hub caught up: liveness decisions resume, every node gets a fresh heartbeat window")
            self.core.after_load(now)
        self.liveness_paused = behind
        return not behind

    def _ingest(self, item: Inbound, out: _BatchOut) -> list[Event]:
        at = item.at
        try:
            message = self.receiver.receive(item.topic, item.payload, at)
        except ProtocolError as exc:
            self.metrics.rejected[exc.reason] += 1
            self.intake.log.warning(exc.reason, f"refused {exc.reason}: {item.topic[:120]}: {exc}")
            return []
        header, body = message.header, message.body
        node = header.src
        self.metrics.messages.labels(header.type, "accepted").inc()
        if isinstance(body, Enroll):
            return self.admin.enroll(node, body, at, out.replies, out.senders)
        out.senders.add(node)
        if isinstance(body, Birth):
            out.born.add(node)
        elif not isinstance(body, Death) and node not in out.born:
            self._ask_rebirth(node, at, out.replies)
        if self.core.touch(node, at):
            seen: list[Event] = [NodeSeen(at, node)]
        else:
            seen = []
        if isinstance(body, Heartbeat):
            self.views[node].heartbeat = body
        elif isinstance(body, Telemetry):
            view = self.views[node]
            view.telemetry, view.telemetry_at = dict(body.metrics), body.at or header.ts
        elif isinstance(body, Birth):
            self.views[node].version = body.version
        for observer in self.observers:
            observer.node_message(node, body)  # after the views hold what it says
        if isinstance(body, Heartbeat):
            return seen
        if isinstance(body, Telemetry):
            return seen + self._health(node, dict(body.metrics), at)
        if isinstance(body, Birth):
            running = tuple((r.run, r.step, r.attempt, r.fence) for r in body.running)
            return [NodeBorn(at, node, header.boot, body.profile, dict(body.labels), tuple(body.caps), body.slots,
                             dict(body.resources), running, body.hb, body.tel)]
        if isinstance(body, Death):
            return [NodeDied(at, node, header.boot, body.reason)]
        if isinstance(body, StepEvent):
            out.acks[node].append(body.eid)
            if body.event == "progress":
                return seen
            return seen + [StepReported(at, node, body.attempt, body.fence, body.event, body.reason)]
        if isinstance(body, StepResult):
            out.acks[node].append(body.eid)
            return seen + [ResultReported(at, node, body.attempt, body.fence, body.ok, dict(body.output), body.error)]
        return seen

    def _ask_rebirth(self, node: str, at: int, replies: list[tuple[str, Any]]) -> None:
        """A node that is alive (it just sent a verified message) but that the hub does not hold online (declared
        failed during a stall, offline, or never seen because its birth was lost) is asked for a birth. Recovery is
        a protocol rule, not a reconnect: the birth lists its attempts and the hub cancels those it moved."""
        known = self.core.nodes.get(node)
        if known is not None and known.state in ("online", "suspected"):
            return
        if at - self._rebirth_asked.get(node, -REBIRTH_EVERY_MS) < REBIRTH_EVERY_MS:
            return
        self._rebirth_asked[node] = at  # bounded: only enrolled senders get past the signature check
        log.info("node %s is alive but %s here: asking it for a birth", node,
                 known.state if known is not None else "unknown")
        replies.append((node, Config(rebirth=True)))

    def _health(self, node_id: str, metrics: dict[str, float], at: int) -> list[Event]:
        """Classify a telemetry sample; health changes and the actions they call for become journal events."""
        node = self.core.nodes.get(node_id)
        if node is None:
            return []
        if self.core.overloaded and node.health == "healthy":
            return []  # shedding load: only nodes already in trouble are followed closely
        thresholds = self.config.policy.thresholds_for(node.profile, self._thresholds_of(node.profile))
        self.tracker.seed(node_id, node.health, node.throttled, list(thresholds))
        changes, actions = self.tracker.observe(node_id, metrics, thresholds, at)
        events: list[Event] = [HealthChanged(at, node_id, c.health, c.metric, c.value, c.threshold, c.duration,
                                             c.reason) for c in changes]
        events += [ActionTaken(at, node_id, a.action, a.reason) for a in actions]
        for action in actions:
            log.warning("node %s: %s (%s)", node_id, action.action, action.reason)
        return events

    def _thresholds_of(self, profile: str) -> dict[str, dict[str, float]]:
        if profile not in self._profile_thresholds:
            from agent.profiles import ProfileError, load_profile

            try:
                self._profile_thresholds[profile] = load_profile(profile).thresholds
            except ProfileError:
                self._profile_thresholds[profile] = {}  # unknown profile: the policy's defaults apply
        return self._profile_thresholds[profile]

    async def _monitor_load(self) -> None:
        """Sample the hub's own event-loop lag, journal commit time and CPU once a second."""
        import psutil

        process = psutil.Process()
        process.cpu_percent(None)
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(1.0)
            lag_ms = (loop.time() - started - 1.0) * 1000
            change = self.load.observe(lag_ms, self.journal.stats.last_seconds * 1000, process.cpu_percent(None))
            if change is not None:
                log.warning("hub %s: %s", "overloaded" if change else "recovered", self.load.reason)
                await self.request([HubLoadChanged(now_ms(), change, self.load.reason)])

    async def _send(self, commands: list[Command], acks: dict[str, list[int]], replies: list[tuple[str, Any]],
                    now: int) -> None:
        session = self.session
        if session is None:
            return  # nothing sent is lost: unanswered assignments time out and are placed again
        outgoing = []
        for command in commands:
            if isinstance(command, SendAssign):
                body: Any = Assign(command.run, command.step, command.attempt, command.fence, command.uses,
                                   command.inputs, command.timeout)
            elif isinstance(command, SendCancel):
                body = Cancel(tuple(AttemptRef(*ref) for ref in command.refs), command.reason[:200])
            elif isinstance(command, SendDrain):
                body = Drain(command.on)
            elif isinstance(command, SendConfig):
                body = Config(None, command.tel)
            else:
                continue
            outgoing.append((command.node, body))
        outgoing += [(node, Ack(tuple(eids))) for node, eids in acks.items()]
        outgoing += replies
        sends = []
        for node, body in outgoing:
            try:
                out = self.signer.seal(body, now, dst=node, ttl_ms=COMMAND_TTL_MS)
            except ProtocolError as exc:  # a bug of ours must not stop the hub
                log.error("not sending an invalid %s to %s: %s", type(body).__name__, node, exc)
                continue
            if len(out.payload) > DEFAULT_MAX_SIZE:  # the node would drop it unread; an assignment never gets here
                log.error("not sending a %s of %d bytes to %s: over the %d-byte message limit", type(body).__name__,
                          len(out.payload), node, DEFAULT_MAX_SIZE)
                continue
            sends.append(session.publish(out.topic, out.payload, qos=1))
        if sends:
            results = await asyncio.gather(*sends, return_exceptions=True)
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                log.warning("%d command(s) not sent: %s", len(failed), failed[0])

    # -- operator requests (called from the API, in the same event loop) ----------------------------------------

    async def request(self, facts: list[Event], result: Any = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.requests.append(_Request(facts, future, result))
        self.intake.wake()
        return await future

    async def submit(self, workflow: Workflow, inputs: dict[str, Any], key: str | None) -> tuple[str, bool]:
        """Returns (run id, created). A repeated idempotency key returns the first run."""
        if key and key in self.core.keys:
            return self.core.keys[key], False
        try:
            resolved = workflow.resolve_inputs(inputs)
        except WorkflowError as exc:
            raise OperatorError(str(exc), 422) from None
        spec = workflow.model_dump(by_alias=True, mode="json")
        # A step whose assignment can never be sent is refused now rather than retried forever. The check encodes
        # what the core will send (the workflow as journaled), off the event loop: a large `with` takes a while.
        problems = await asyncio.to_thread(lambda: workflow_problems(compile_workflow(spec)))
        if problems:
            raise OperatorError("; ".join(problems[:10]), 422)
        run_id = f"r-{uuid.uuid4().hex[:12]}"
        at = now_ms()
        deadline = at + int(1000 * (workflow.timeout or DEFAULT_RUN_DEADLINE_S))
        await self.request([RunSubmitted(at, run_id, spec, resolved, key, deadline)])
        return (self.core.keys.get(key, run_id) if key else run_id), True

    async def cancel_run(self, run_id: str, reason: str, force_fail: bool) -> None:
        if run_id not in self.core.runs and run_id not in self.core.archived:
            raise OperatorError(f"no run {run_id!r}", 404)
        await self.request([RunCancelRequested(now_ms(), run_id, reason, force_fail)])

    async def node_action(self, node_id: str, action: str, on: bool = True, kid: str | None = None) -> dict[str, Any]:
        return await self.admin.action(node_id, action, on, kid)  # hub/node_admin.py

    async def add_node(self, node_id: str, key: bytes) -> dict[str, Any]:
        return await self.admin.add(node_id, key)

    async def _command(self, node: str, body: Any) -> None:
        if self.session is not None:
            out = self.signer.seal(body, now_ms(), dst=node, ttl_ms=COMMAND_TTL_MS)
            with contextlib.suppress(TransportError):
                await self.session.publish(out.topic, out.payload, qos=1)
