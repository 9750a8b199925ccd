"""The hub process: MQTT session, enrollment, and the write-ahead core loop around the pure `Core`.

Loop: take a batch of inbound messages and operator requests, turn them into facts, make them durable (one group
commit), apply them, ask the core for decisions, make those durable and apply them, and only then send what the
events call for (assignments, cancels, acks). A crash at any point loses nothing the hub acted on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinydb import TinyDB

from agent.identity import DurableJSONStorage
from agent.keys import load_key, write_new_key
from agent.node import Backoff, RateLimitedLog
from agent.telemetry import now_ms
from agent.transport import BrokerSettings, MqttTransport, Session, Transport, TransportError, Will
from protocols import (HUB_ID, Ack, Assign, AttemptRef, Birth, Cancel, Config, Death, Drain, Enroll, Heartbeat,
                       HubState, Keyring, ProtocolError, Receiver, ReplayWindow, Signer, StepEvent, StepResult,
                       Telemetry)

from . import __version__
from .events import (ActionTaken, Event, HealthChanged, HubLoadChanged, NodeBorn, NodeDied, NodeDrainSet,
                     NodeRemoved, NodeSeen, ReplayMarks, ResultReported, RunCancelRequested, RunSubmitted,
                     StepReported)
from .health import HealthTracker, LoadMonitor, Policy
from .journal import Journal
from .metrics import HubMetrics
from .registry import Registry, RegistryError
from .state import Command, Core, SendAssign, SendCancel, SendConfig, SendDrain
from .workflow import Workflow, WorkflowError

log = logging.getLogger("fleetflow.hub")

DEFAULT_RUN_DEADLINE_S = 24 * 3600  # every run ends: one without a timeout gets this deadline
COMMAND_TTL_MS = 60_000
TICK_S = 0.1
TIMER_SCAN_S = 0.1  # liveness, timeouts and breakers are scanned at most this often; placement after every batch
MARKS_EVERY_S = 5.0


@dataclass
class HubConfig:
    broker: str
    fleet: str
    data: Path
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    auto_accept: bool = False
    enroll_token: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    snapshot_every: int = 10_000
    policy: Policy = field(default_factory=Policy)


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
class NodeView:
    """What the hub knows of a node beyond the journal: latest heartbeat and telemetry (not journaled)."""

    heartbeat: Heartbeat | None = None
    telemetry: dict[str, float] = field(default_factory=dict)


class Hub:
    def __init__(self, config: HubConfig, transport: Transport | None = None) -> None:
        self.config = config
        data = Path(config.data)
        data.mkdir(parents=True, exist_ok=True)
        os.chmod(data, 0o700)
        key_path = data / "hub.key"
        self.key = load_key(key_path) if key_path.exists() else write_new_key(key_path)
        self.meta = TinyDB(str(data / "hub.json"), storage=DurableJSONStorage)
        self.registry = Registry(data / "nodes.json")
        self.journal = Journal(data / "journal.sqlite", config.snapshot_every)
        self.core: Core = self.journal.load()
        self.core.policy = config.policy  # decisions already journaled keep the policy they were made under
        self.core.after_load(now_ms())
        self.tracker = HealthTracker(config.policy)
        self.load = LoadMonitor(config.policy.self_protection)
        self._profile_thresholds: dict[str, dict[str, dict[str, float]]] = {}
        self.token = self._token(data / "api.token")
        keyring = Keyring(self.registry.accepted_keys())
        windows = {k: ReplayWindow.from_dict(v) for k, v in self.core.windows.items()}
        self.receiver = Receiver(config.fleet, keyring, windows=windows)
        boot = int((self.meta.get(doc_id=1) or {}).get("boot", 0)) + 1
        self._set_meta(boot=boot, fleet=config.fleet)
        self.signer = Signer(self.key, config.fleet, HUB_ID, boot=boot)
        self.transport = transport or MqttTransport(BrokerSettings(config.broker, config.username, config.password,
                                                                   config.ca_file))
        self.metrics = HubMetrics(self)
        self.views: dict[str, NodeView] = collections.defaultdict(NodeView)
        self.inbox: asyncio.Queue[tuple[str, bytes, int] | _Request] = asyncio.Queue(maxsize=100_000)
        self.session: Session | None = None
        self._refusals = RateLimitedLog()
        self._stop = asyncio.Event()
        self._marks_at = 0.0
        self._timers_at = 0.0
        self.api_url: str | None = None

    # -- files ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _token(path: Path) -> str:
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, token.encode() + b"\n")
        finally:
            os.close(fd)
        return token

    def check_token(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _set_meta(self, **fields: Any) -> None:
        table = self.meta.table("_default")
        if table.get(doc_id=1) is None:
            table.insert(fields)
        else:
            table.update(fields, doc_ids=[1])

    @property
    def public_key(self) -> bytes:
        return bytes(self.key.verify_key)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    async def run(self, api: bool = True) -> None:
        server_task = None
        if api:
            from .api import serve

            server_task = asyncio.create_task(serve(self), name="api")
        core_task = asyncio.create_task(self._core_loop(), name="core")
        monitor_task = asyncio.create_task(self._monitor_load(), name="load")
        backoff = Backoff()
        try:
            while not self._stop.is_set():
                offline = self.signer.seal(HubState(False, self.public_key, __version__), now_ms())
                try:
                    async with self.transport.connect(f"{self.config.fleet}.hub",
                                                      Will(offline.topic, offline.payload, 1, True)) as session:
                        backoff.reset()
                        await self._session(session)
                except* TransportError as group:
                    log.warning("broker connection: %s", group.exceptions[0])
                finally:
                    self.session = None
                if self._stop.is_set():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff.next())
        finally:
            core_task.cancel()
            monitor_task.cancel()
            if server_task is not None:
                server_task.cancel()
            await asyncio.gather(core_task, monitor_task, *([server_task] if server_task else []),
                                 return_exceptions=True)
            marks = self._marks_event(force=True)
            if marks is not None:  # the core loop has stopped, so nothing else writes now
                self.journal.append_now([marks])
            self.journal.close()
            self.registry.close()
            self.meta.close()

    async def _session(self, session: Session) -> None:
        await session.subscribe(f"fleetflow/v1/{self.config.fleet}/node/+/+", qos=1)
        online = self.signer.seal(HubState(True, self.public_key, __version__), now_ms())
        await session.publish(online.topic, online.payload, qos=1, retain=True)
        self.session = session
        log.info("hub online for fleet %s (boot %d)", self.config.fleet, self.signer.boot)
        reader = asyncio.create_task(self._read(session))
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # raises the transport error
            else:  # a clean stop: say we are offline before leaving
                offline = self.signer.seal(HubState(False, self.public_key, __version__), now_ms())
                await session.publish(offline.topic, offline.payload, qos=1, retain=True)
        finally:
            reader.cancel()
            stop.cancel()
            await asyncio.gather(reader, stop, return_exceptions=True)

    async def _read(self, session: Session) -> None:
        async for topic, payload in session.messages():
            if topic.endswith("/cmd"):
                continue  # our own commands
            await self.inbox.put((topic, payload, now_ms()))

    # -- the core loop -------------------------------------------------------------------------------------------

    async def _core_loop(self) -> None:
        while True:
            batch: list[tuple[str, bytes, int] | _Request] = []
            try:
                batch.append(await asyncio.wait_for(self.inbox.get(), TICK_S))
            except asyncio.TimeoutError:
                pass
            while len(batch) < 2000 and not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            try:
                await self._process(batch)
            except Exception:
                log.exception("core loop error (the batch is dropped; the journal holds everything applied)")
                for item in batch:
                    if isinstance(item, _Request) and not item.future.done():
                        item.future.set_exception(OperatorError("internal error", 500))

    async def _process(self, batch: list[tuple[str, bytes, int] | _Request]) -> None:
        now = now_ms()
        facts: list[Event] = []
        acks: dict[str, list[int]] = collections.defaultdict(list)
        replies: list[tuple[str, Any]] = []
        requests: list[_Request] = []
        for item in batch:
            if isinstance(item, _Request):
                facts.extend(item.facts)
                requests.append(item)
            else:
                facts.extend(self._ingest(*item, acks, replies))
        marks = self._marks_event()
        if marks is not None:
            facts.append(marks)
        commands: list[Command] = []
        if facts:
            started = time.perf_counter()
            await self.journal.append(facts)
            self.metrics.journal_commit.observe(time.perf_counter() - started)
            for fact in facts:
                if isinstance(fact, ResultReported):
                    # run time of an accepted result, from the core's own record of when its attempt started
                    attempt = self.core.current(fact.attempt, fact.node, fact.fence)
                    if attempt is not None and attempt.started_at is not None:
                        self.metrics.step_latency.observe((fact.at - attempt.started_at) / 1000)
                commands += self.core.apply(fact)
                self.metrics.count_adaptation(fact)
        scan = time.monotonic() - self._timers_at >= TIMER_SCAN_S
        if scan:
            self._timers_at = time.monotonic()
        for _ in range(5):  # decisions can enable further decisions (a loss re-queues what a placement then moves)
            decisions = self.core.decide(now_ms(), timers=scan)
            if not decisions:
                break
            await self.journal.append(decisions)
            for decision in decisions:
                commands += self.core.apply(decision)
                self.metrics.count_decision(decision)
        applied = now_ms()
        for item in batch:
            if not isinstance(item, _Request):
                self.metrics.ingest_lag.observe((applied - item[2]) / 1000)
        self.registry.flush()  # enrollment answers go out only once the registry holds them
        for request in requests:
            if not request.future.done():
                request.future.set_result(request.result)
        await self._send(commands, acks, replies, now)
        if self.journal.snapshot_due():
            self.journal.snapshot(self.core)

    def _ingest(self, topic: str, payload: bytes, at: int, acks: dict[str, list[int]],
                replies: list[tuple[str, Any]]) -> list[Event]:
        try:
            message = self.receiver.receive(topic, payload, at)
        except ProtocolError as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            source = topic.split("/")[4] if topic.count("/") >= 5 else "?"
            self._refusals.warning((source, exc.reason), f"refused a message on {topic[:120]}: {exc.reason}: {exc}")
            return []
        header, body = message.header, message.body
        node = header.src
        self.metrics.messages.labels(header.type, "accepted").inc()
        if isinstance(body, Enroll):
            return self._enroll(node, body, at, replies)
        if self.core.touch(node, at):
            seen: list[Event] = [NodeSeen(at, node)]
        else:
            seen = []
        if isinstance(body, Heartbeat):
            self.views[node].heartbeat = body
            return seen
        if isinstance(body, Telemetry):
            view = self.views[node]
            view.telemetry = dict(body.metrics)
            return seen + self._health(node, dict(body.metrics), at)
        if isinstance(body, Birth):
            running = tuple((r.run, r.step, r.attempt, r.fence) for r in body.running)
            return [NodeBorn(at, node, header.boot, body.profile, dict(body.labels), tuple(body.caps), body.slots,
                             dict(body.resources), running, body.hb, body.tel)]
        if isinstance(body, Death):
            return [NodeDied(at, node, header.boot, body.reason)]
        if isinstance(body, StepEvent):
            acks[node].append(body.eid)
            if body.event == "progress":
                return seen
            return seen + [StepReported(at, node, body.attempt, body.fence, body.event, body.reason)]
        if isinstance(body, StepResult):
            acks[node].append(body.eid)
            return seen + [ResultReported(at, node, body.attempt, body.fence, body.ok, dict(body.output), body.error)]
        return seen

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

    def _enroll(self, node: str, body: Enroll, at: int, replies: list[tuple[str, Any]]) -> list[Event]:
        token_ok = bool(self.config.enroll_token and body.token
                        and hmac.compare_digest(body.token, self.config.enroll_token))
        state = self.registry.request(node, body.key, body.profile, dict(body.labels), at, self.config.auto_accept,
                                      token_ok)
        if state == "accepted":
            self.receiver.keyring.add(node, body.key)
        verdict = state if state in ("accepted", "pending") else "rejected"
        replies.append((node, Ack((), verdict)))
        if state == "pending":
            log.info("node %s asks to enroll (kid %s); accept with: fleetflow nodes accept %s", node,
                     body.key.hex()[:16], node)
        return []

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
            sends.append(session.publish(out.topic, out.payload, qos=1))
        if sends:
            results = await asyncio.gather(*sends, return_exceptions=True)
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                log.warning("%d command(s) not sent: %s", len(failed), failed[0])

    def _marks_event(self, force: bool = False) -> ReplayMarks | None:
        """The replay windows as an event, every MARKS_EVERY_S seconds when they changed (and at shutdown)."""
        now = time.monotonic()
        if not force and now - self._marks_at < MARKS_EVERY_S:
            return None
        self._marks_at = now
        windows = {k: w.to_dict() for k, w in self.receiver.windows.items()}
        return ReplayMarks(now_ms(), windows) if windows != self.core.windows else None

    # -- operator requests (called from the API, in the same event loop) ----------------------------------------

    async def request(self, facts: list[Event], result: Any = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self.inbox.put(_Request(facts, future, result))
        return await future

    async def submit(self, workflow: Workflow, inputs: dict[str, Any], key: str | None) -> tuple[str, bool]:
        """Returns (run id, created). A repeated idempotency key returns the first run."""
        if key and key in self.core.keys:
            return self.core.keys[key], False
        try:
            resolved = workflow.resolve_inputs(inputs)
        except WorkflowError as exc:
            raise OperatorError(str(exc), 422) from None
        run_id = f"r-{uuid.uuid4().hex[:12]}"
        at = now_ms()
        deadline = at + int(1000 * (workflow.timeout or DEFAULT_RUN_DEADLINE_S))
        await self.request([RunSubmitted(at, run_id, workflow.model_dump(by_alias=True, mode="json"), resolved,
                                         key, deadline)])
        return (self.core.keys.get(key, run_id) if key else run_id), True

    async def cancel_run(self, run_id: str, reason: str, force_fail: bool) -> None:
        if run_id not in self.core.runs and run_id not in self.core.archived:
            raise OperatorError(f"no run {run_id!r}", 404)
        await self.request([RunCancelRequested(now_ms(), run_id, reason, force_fail)])

    async def node_action(self, node_id: str, action: str, on: bool = True) -> dict[str, Any]:
        at = now_ms()
        try:
            if action == "drain":
                if node_id not in self.core.nodes:
                    raise OperatorError(f"no node {node_id!r} has announced itself", 404)
                await self.request([NodeDrainSet(at, node_id, on)])
                await self._command(node_id, Drain(on))
                return {"id": node_id, "draining": on}
            doc = self.registry.set_state(node_id, {"accept": "accepted", "reject": "rejected",
                                                    "revoke": "revoked"}[action], at)
        except RegistryError as exc:
            raise OperatorError(str(exc), 404 if "no node" in str(exc) else 409) from None
        if doc["state"] == "accepted":
            self.receiver.keyring.add(node_id, bytes.fromhex(doc["key"]))
            await self._command(node_id, Ack((), "accepted"))
        else:
            self.receiver.keyring.remove_owner(node_id)  # its messages are refused from now on
            if node_id in self.core.nodes:
                await self.request([NodeRemoved(at, node_id, f"{doc['state']} by an operator")])
        return doc

    async def add_node(self, node_id: str, key: bytes) -> dict[str, Any]:
        try:
            doc = self.registry.add(node_id, key, now_ms())
        except (RegistryError, Exception) as exc:
            raise OperatorError(str(exc), 422) from None
        self.receiver.keyring.add(node_id, key)
        return doc

    async def _command(self, node: str, body: Any) -> None:
        if self.session is not None:
            out = self.signer.seal(body, now_ms(), dst=node, ttl_ms=COMMAND_TTL_MS)
            with contextlib.suppress(TransportError):
                await self.session.publish(out.topic, out.payload, qos=1)
