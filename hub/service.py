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
from collections.abc import Coroutine, Iterable
from typing import Any

from nacl.signing import SigningKey
from tinydb import TinyDB

from agent.runtime.backoff import Backoff
from agent.runtime.clock import Clock, now_ms
from agent.runtime.startup import DataLock, broker_unreachable
from agent.runtime.storage import DurableJSONStorage
from agent.runtime.timeouts import within
from agent.runtime.transport import MqttTransport, Session, Transport, TransportError, Will, session_client_id
from protocols import HUB_ID, Keyring, Outgoing, ReplayWindow, Signer

from . import __version__
from .artifacts import ArtifactStore, resolve_artifacts
from .clones import CloneWatch, report_conflicts
from .config import HubConfig
from .deployments.model import DeploymentSpec
from .errors import Conflict, HubTaskFailed, InternalError, NotFound, OperatorError, Unprocessable
from .eventlog import apply_logged
from .events import Event, HubLoadChanged, ResultReported, RunCancelRequested, RunSubmitted
from .health import HealthTracker, LoadMonitor
from .ingest.workers import IngestWorkers
from .intake import Inbound, Intake
from .journal import Journal, Mark
from .keys import ApiTokens, HubKeys, ensure_token, follow_rotation
from .metrics import HubMetrics
from .broker_acl import BrokerClients
from .mirror import JsonMirror
from .node_admin import NodeAdmin, reset_stale_windows
from .protocol import EnrollSettings, HubProtocol, NodeView, Reply
from .registry import Registry
from .runnable import workflow_problems
from .sparkplug import NoBridge, bridge_for
from .state import Command, Core, compile_workflow
from .ui.feed import LiveFeed
from .workflow import Workflow, WorkflowError

log = logging.getLogger("fleetflow.hub")

__all__ = ["NODE_KINDS_READ", "Hub", "HubConfig", "NodeView"]

DEFAULT_RUN_DEADLINE_S = 24 * 3600  # every run ends: one without a timeout gets this deadline
TICK_S = 0.1
TIMER_SCAN_MS = 100  # liveness, timeouts and breakers are scanned at most this often; placement after every batch
BATCH = 2000
READ_BURST = 256      # packets read per readiness of the broker socket
# The hub is behind, and decides no liveness, while a message has waited BEHIND_MS in the intake, for
# BACKLOG_GRACE_MS after a socket read ended with more waiting, and for SHED_GRACE_MS after the intake's queues were
# full (a sender over its own quota does not count: see hub/intake.py).
BEHIND_MS = 2000
BACKLOG_GRACE_MS = 1000
SHED_GRACE_MS = 5000
NODE_KINDS_READ = ("enroll", "birth", "death", "hb", "tel", "evt")  # never `cmd`: our own commands


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
    replies: list[Reply] = field(default_factory=list)
    senders: set[str] = field(default_factory=set)
    born: set[str] = field(default_factory=set)


class Hub:
    def __init__(self, config: HubConfig, transport: Transport | None = None, clock: Clock = now_ms) -> None:
        self.config = config
        # Every time the hub reads (ms since the epoch): a simulation hands it a virtual clock.
        self.clock = clock
        data = Path(config.data)
        # Before anything in the directory is read or changed: one hub per data directory (agent/runtime/startup.py).
        self.lock = DataLock.acquire(data)
        os.chmod(data, 0o700)
        self.keys = HubKeys.open(data, clock())  # hub.key, and a key rotation under way (hub/keys.py)
        self.meta = TinyDB(str(data / "hub.json"), storage=DurableJSONStorage)
        self.registry = Registry(data / "nodes.json")
        self.journal = Journal(data / "journal.sqlite", config.snapshot_every)
        self.core: Core = self.journal.load()
        self.core.policy = config.policy  # decisions already journaled keep the policy they were made under
        self.core.after_load(clock())
        self.load = LoadMonitor(config.policy.self_protection)
        self._profile_thresholds: dict[str, dict[str, dict[str, float]]] = {}
        self.tokens = ApiTokens(data)  # api.token, and the previous one during a rotation's overlap
        self.artifacts = ArtifactStore(data / "artifacts", lambda: self.key)  # signed with the current key
        keyring = Keyring(self.registry.accepted_keys())
        # The receiver also reads what its replay check refuses: two devices with one identity (hub/clones.py).
        receiver = CloneWatch(config.fleet, keyring, windows=self._restore_windows())
        boot = int((self.meta.get(doc_id=1) or {}).get("boot", 0)) + 1
        self._set_meta(boot=boot, fleet=config.fleet)
        enrollment = EnrollSettings(config.auto_accept, config.enroll_token, config.enroll_token_uses,
                                    config.max_pending)
        self.protocol = HubProtocol(self.core, receiver, Signer(self.key, config.fleet, HUB_ID, boot=boot),
                                    config.policy, enrollment, self._thresholds_of)
        self.intake = Intake(config.fleet, receiver, clock)
        self.transport = transport or MqttTransport(config.broker_settings(), incoming=lambda maxsize=0: self.intake,
                                                    read_burst=READ_BURST, on_backlog=self.intake.note_backlog)
        self.metrics = HubMetrics(self)
        self.metrics.rejected = self.protocol.refused  # counted where refused
        self.ingest = IngestWorkers(self, config.ingest_workers)  # does nothing unless --ingest-workers
        self.mirror = JsonMirror(self, config.json_mirror)  # does nothing unless --json-mirror
        self.sparkplug = bridge_for(self, config.sparkplug)  # a NoBridge, doing nothing, unless --sparkplug
        self.broker_clients = BrokerClients(self, config.broker_admin)  # does nothing unless --broker-admin-file
        # What follows the hub's applied events and verified node messages, on the core loop (never blocking).
        self.feed = LiveFeed(self)  # the dashboard's live stream and telemetry history (hub/ui/)
        self.observers: tuple[JsonMirror | NoBridge | LiveFeed, ...] = (self.mirror, self.sparkplug, self.feed)
        self.requests: collections.deque[_Request] = collections.deque()
        self.session: Session | None = None
        self._stop = asyncio.Event()
        self.failure: HubTaskFailed | None = None  # set when a task of the hub failed: `run` raises it after stopping
        self._timers_at = -TIMER_SCAN_MS
        self.liveness_paused = False
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
        return self.tokens.check(given, self.clock())

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

    # What the protocol object holds, by the names the API, the observers and the tools read.
    @property
    def receiver(self) -> CloneWatch:
        return self.protocol.receiver

    clones = receiver

    @property
    def signer(self) -> Signer:
        return self.protocol.signer

    @property
    def views(self) -> dict[str, NodeView]:
        return self.protocol.views

    @property
    def tracker(self) -> HealthTracker:
        return self.protocol.tracker

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
        `first_connection_required`); a broker lost later is retried with backoff, forever. An unexpected exception
        in any of the hub's tasks (the core loop, the API, ...) stops the hub and raises `HubTaskFailed` once
        everything is closed."""
        tasks: list[asyncio.Task[None]] = []
        backoff = Backoff()
        connected = False
        try:
            if api:
                from .api import serve

                # Bound before the broker is tried: a port in use stops the start, rather than leave a hub with no API.
                tasks.append(self._crash_only("API", serve(self, self._listen())))
                tasks.append(self._crash_only("live feed", self.feed.run(self._stop)))
            tasks.append(self._crash_only("core loop", self._core_loop()))
            tasks.append(self._crash_only("ingest workers", self.ingest.run(self._stop)))
            tasks.append(self._crash_only("load monitor", self._monitor_load()))
            tasks.append(self._crash_only("clone reports", report_conflicts(self, self.clones)))
            tasks.append(self._crash_only("JSON mirror", self.mirror.run(self._stop)))
            tasks.append(self._crash_only("Sparkplug bridge", self.sparkplug.run()))
            tasks.append(self._crash_only("broker logins", self.broker_clients.run(self._stop)))
            while not self._stop.is_set():
                offline = self.signer.seal(self.keys.state(False, __version__), self.clock())
                failure: TransportError | None = None
                try:
                    async with self.transport.connect(session_client_id(f"{self.config.fleet}.hub"),
                                                      Will(offline.topic, offline.payload, 1, True)) as session:
                        connected = True
                        backoff.reset()
                        await self._session(session)
                except* TransportError as group:
                    failure = group.exceptions[0]  # type: ignore[assignment]
                except* Exception as group:  # a bug of ours in the session: the same rule as the tasks'
                    self._failed("broker session", "broker session failed", group.exceptions[0])  # type: ignore[arg-type]
                finally:
                    self.session = None
                if failure is not None:
                    if first_connection_required and not connected and not self._stop.is_set():
                        raise broker_unreachable(self.config.broker, failure)
                    log.warning("broker connection: %s", failure)
                if self._stop.is_set():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(backoff.next(), self._stop.wait())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.journal.close()
            self.registry.close()
            self.meta.close()
            self.lock.release()
        if self.failure is not None:
            raise self.failure

    async def _session(self, session: Session) -> None:
        for kind in NODE_KINDS_READ if not self.ingest.count else ():  # else the workers read them
            await session.subscribe(f"fleetflow/v1/{self.config.fleet}/node/+/{kind}", qos=1)
        await self.ingest.ready(self._stop)
        # Every node that sees this (a newer hub state) publishes a birth: the hub may have missed births while it
        # was away, or the nodes reconnected to a restarted broker before it did.
        await self._publish_state(session, True)
        self.session = session
        log.info("hub online for fleet %s (boot %d)", self.config.fleet, self.signer.boot)
        reader = asyncio.create_task(session.closed())
        stop = asyncio.create_task(self._stop.wait())
        keys = asyncio.create_task(follow_rotation(self.keys, self.signer, lambda: self._publish_state(session, True),
                                                   self.clock))
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
        out = self.signer.seal(state, self.clock())
        await session.publish(out.topic, out.payload, qos=1, retain=True)
        if online and state.next_key is not None:
            self.keys.announced(self.clock())

    # -- the core loop -------------------------------------------------------------------------------------------

    async def _core_loop(self) -> None:
        while True:
            if not self.requests:
                await self.intake.wait(min(TICK_S, max(0.0, (self.core.deploys.wake_at - self.clock()) / 1000)))
            batch: list[Inbound | _Request] = []
            while self.requests and len(batch) < BATCH // 4:
                batch.append(self.requests.popleft())
            batch.extend(self.intake.take(BATCH - len(batch)))
            try:
                await self._process(batch)
            except Exception as exc:
                # Crash-only: state half-applied in memory is not trusted. The journal holds everything the hub
                # acted on; what the batch carried that is not there yet was never acknowledged by the hub
                # (agents send results again until acked, and births answer the restarted hub's state).
                self._fail_requests(batch)
                self._failed("core loop", f"core loop failed on a batch of {len(batch)}", exc)
                return

    # -- crash-only tasks ----------------------------------------------------------------------------------------

    def _crash_only(self, task: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run one of the hub's long-running tasks under the core loop's rule: an unexpected exception stops the
        hub (a hub quietly without its API, mirror or load monitor is worse than one a supervisor restarts)."""
        running = asyncio.create_task(work, name=task)
        running.add_done_callback(functools.partial(self._task_done, task))
        return running

    def _task_done(self, task: str, done: asyncio.Task[None]) -> None:
        if done.cancelled():  # how the hub stops its tasks
            return
        exc = done.exception()
        if isinstance(exc, Exception):  # a BaseException (SystemExit, KeyboardInterrupt) leaves the loop itself
            self._failed(task, f"{task} task failed", exc)

    def _failed(self, task: str, what: str, exc: Exception) -> None:
        """The first failure stops the hub with one CRITICAL line; what fails after it (a request the stop refused,
        a task torn down with the rest) is its consequence, logged quietly."""
        if self.failure is not None:
            log.debug("the hub's %s after it failed: %s: %s", what, type(exc).__name__, exc)
            return
        if self._stop.is_set():
            log.warning("the hub's %s while the hub was stopping: %s: %s", what, type(exc).__name__, exc)
            return
        log.critical("the hub's %s (%s: %s): stopping; restart the hub, it resumes from its journal", what,
                     type(exc).__name__, exc, exc_info=exc)
        self._fail_requests(self.requests)
        self.failure = HubTaskFailed(task, f"the hub's {what}: {type(exc).__name__}: {exc}")
        self.failure.__cause__ = exc
        self.stop()

    @staticmethod
    def _fail_requests(items: Iterable[Inbound | _Request]) -> None:
        for item in items:
            if isinstance(item, _Request) and not item.future.done():
                item.future.set_exception(InternalError("the hub stopped on an internal error"))

    async def _process(self, batch: list[Inbound | _Request]) -> None:
        now = self.clock()
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
        scan_at = self.clock()
        scan = scan_at - self._timers_at >= TIMER_SCAN_MS
        if scan:
            self._timers_at = scan_at
        liveness = self._liveness(scan_at)
        for _ in range(5):  # decisions can enable further decisions (a loss re-queues what a placement then moves)
            decisions = self.core.decide(self.clock(), timers=scan, liveness=liveness)
            if not decisions:
                break
            await self.journal.append(decisions)
            for decision in decisions:
                commands += apply_logged(self.core, decision)
                for observer in self.observers:
                    observer.applied(decision)
                self.metrics.count_decision(decision)
        applied = self.clock()
        for item in batch:
            if not isinstance(item, _Request):
                self.metrics.ingest_lag.observe((applied - item.at) / 1000)
        self.registry.flush()  # enrollment answers go out only once the registry holds them
        for request in requests:
            if not request.future.done():
                request.future.set_result(request.result)
        if self.session is not None:  # nothing sent is lost: unanswered assignments time out and are placed again
            await self._publish(self.protocol.outgoing(commands, out.acks, out.replies, now))
        if self.journal.snapshot_due():
            self.journal.snapshot(self.core)

    def _liveness(self, now: int) -> bool:
        """False while the hub is behind (its intake was full recently, or a message has waited too long): a silence
        that may be the hub's own is not held against any node. On catching up every node gets a fresh window."""
        oldest = self.intake.oldest_ms()
        pressure, backlog = self.intake.pressure_ms, self.intake.backlog_ms  # 0: never (a clock may start near 0)
        behind = bool((pressure and now - pressure < SHED_GRACE_MS) or (backlog and now - backlog < BACKLOG_GRACE_MS)
                      or (oldest is not None and now - oldest > BEHIND_MS) or self.core.overloaded)
        if behind and not self.liveness_paused:
            log.warning("hub is behind (intake full or lagging): liveness decisions suspended")
        elif not behind and self.liveness_paused:
            log.warning("hub caught up: liveness decisions resume, every node gets a fresh heartbeat window")
            self.core.after_load(now)
        self.liveness_paused = behind
        return not behind

    def _ingest(self, item: Inbound, out: _BatchOut) -> tuple[Event, ...]:
        got = (self.protocol.receive(item.topic, item.payload, item.at, out.born) if item.opened is None
               else self.protocol.receive_opened(item.opened, item.payload, item.at, out.born))
        if got.message is None:
            exc = got.refused
            if exc is not None:  # counted by the protocol
                self.intake.log.warning(exc.reason, f"refused {exc.reason}: {item.topic[:120]}: {exc}")
            return ()
        node, body = got.message.header.src, got.message.body
        self.metrics.accepted(got.message.header.type)
        if got.enroll is not None:
            self.admin.answer(got.enroll, out.replies, out.senders)  # the registry decides (hub/node_admin.py)
            return ()
        out.senders.add(node)
        if got.born:
            out.born.add(node)
        if got.acks:
            out.acks[node] += got.acks
        out.replies += got.replies
        for observer in self.observers:
            observer.node_message(node, body)  # after the views hold what it says
        return got.facts

    def _thresholds_of(self, profile: str) -> dict[str, dict[str, float]]:
        if profile not in self._profile_thresholds:
            from agent.runtime.profiles import ProfileError, load_profile

            try:
                # only complete pairs count (Policy.thresholds_for), whichever mapping type the profile reader uses
                self._profile_thresholds[profile] = {metric: {"high": t["high"], "critical": t["critical"]}
                                                     for metric, t in load_profile(profile).thresholds.items()
                                                     if "high" in t and "critical" in t}
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
                await self.request([HubLoadChanged(self.clock(), change, self.load.reason)])

    async def _publish(self, outgoing: list[Outgoing]) -> None:
        session = self.session
        if session is None or not outgoing:
            return
        results = await asyncio.gather(*(session.publish(out.topic, out.payload, qos=1) for out in outgoing),
                                       return_exceptions=True)
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
            raise Unprocessable(str(exc)) from None
        def checked() -> tuple[dict[str, Any], list[str]]:
            # artifact.install steps carry the signed manifest of the NAME@VERSION they name (hub/artifacts/).
            spec = resolve_artifacts(workflow.model_dump(by_alias=True, mode="json"), self.artifacts)
            # A step whose assignment can never be sent is refused now rather than retried forever. The check
            # encodes what the core will send (the workflow as journaled): a large `with` takes a while.
            return spec, workflow_problems(compile_workflow(spec))

        # Off the event loop, in one trip to a worker thread: each trip costs a wake-up of the loop and, under
        # load, a wait for the GIL (bench/dispatch.py), on the way of every submission to its first assignment.
        spec, problems = await asyncio.to_thread(checked)
        if problems:
            raise Unprocessable("; ".join(problems[:10]))
        run_id = f"r-{uuid.uuid4().hex[:12]}"
        at = self.clock()
        deadline = at + int(1000 * (workflow.timeout or DEFAULT_RUN_DEADLINE_S))
        await self.request([RunSubmitted(at, run_id, spec, resolved, key, deadline)])
        return (self.core.keys.get(key, run_id) if key else run_id), True

    async def cancel_run(self, run_id: str, reason: str, force_fail: bool) -> None:
        if run_id not in self.core.runs and run_id not in self.core.archived:
            raise NotFound(f"no run {run_id!r}")
        await self.request([RunCancelRequested(self.clock(), run_id, reason, force_fail)])

    async def deploy(self, spec: DeploymentSpec, actor: str) -> str:
        """Journal a checked deployment request (hub/deployments/model.py's DeploymentSpec); the core rolls it out.
        Its artifact.install steps get their signed manifests, and every step must fit the wire, as at submit."""
        from .deployments.core import deployable
        from .events import DeploymentCreated

        spec = await asyncio.to_thread(deployable, spec, lambda wf: resolve_artifacts(wf, self.artifacts))
        dep_id = f"d-{uuid.uuid4().hex[:10]}"
        await self.request([DeploymentCreated(self.clock(), dep_id, spec.record(), actor)])
        return dep_id

    async def control_deployment(self, dep_id: str, action: str, force: bool, reason: str) -> None:
        from .deployments.core import control_problem
        from .events import DeploymentControlled

        dep = self.core.deploys.deployments.get(dep_id)
        problem = f"no deployment {dep_id!r}" if dep is None else control_problem(dep, action, force)
        if problem is not None:
            raise (NotFound if dep is None else Conflict)(problem)
        await self.request([DeploymentControlled(self.clock(), dep_id, action, force, reason)])

    async def node_action(self, node_id: str, action: str, on: bool = True, kid: str | None = None) -> dict[str, Any]:
        return await self.admin.action(node_id, action, on, kid)  # hub/node_admin.py

    async def add_node(self, node_id: str, key: bytes) -> dict[str, Any]:
        return await self.admin.add(node_id, key)

    async def _command(self, node: str, body: Any) -> None:
        if self.session is not None:
            await self._publish(self.protocol.outgoing((), {}, [(node, body)], self.clock()))
