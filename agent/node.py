"""The agent's asyncio shell: sessions, loops, and the effects of what `AgentProtocol` decides.

One `Agent` per device. `run()` connects, and reconnects with exponential backoff and jitter, each session with a
new boot. Before connecting it signs the death certificate (the Last Will) for that boot. `stop()` (SIGTERM) drains:
no new work, running steps get the grace period, results are flushed and acknowledged, then the agent publishes
its own death and disconnects cleanly.

Every protocol decision (verifying commands and hub states, following hub keys, when to publish a new birth,
enrollment verdicts) lives in `protocol.AgentProtocol`, which does no I/O. This shell moves bytes, runs the loops
(reader, heartbeat, telemetry, flusher), and applies the protocol's outputs to the runner, the outbox, the identity
files and the log. It reads time only through `clock_ms` and the event loop, so it runs on virtual time too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import sqlite3
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from protocols import Heartbeat, Outgoing, ProtocolError, Receiver, ReplayWindow, kid_for

from . import __version__
from .config import AgentConfig, ConfigError
from .executors import Executor, ExecutorPolicy, build_executors, update_executors
from .identity import Identity
from .outbox import Outbox
from .protocol import (Acked, AgentProtocol, CancelAttempts, Enrolled, EnrollRefused, HubSeen, HubTrust, Ignored,
                       Load, NodeFacts, Output, PinHubKey, PublishBirth, Refused, RunAssign, SaveHubWindow, SetDrain,
                       SetIntervals, SwitchHubKey, TrustNextHubKey)
from .runner import Runner
from .runtime.backoff import Backoff
from .runtime.clock import now_ms
from .runtime.logs import ThrottledLog
from .runtime.profiles import Profile, load_profile
from .runtime.startup import StartupError, broker_unreachable
from .runtime.timeouts import within
from .runtime.transport import MqttTransport, Session, Transport, TransportError, Will, session_client_id
from .telemetry import OverlaySource, PsutilSource, TelemetrySource

log = logging.getLogger("fleetflow.agent")
T = TypeVar("T")

ACK_WAIT_ON_STOP = 5.0
HUB_STATE_WAIT_S = 2.0
RESEND_AFTER = 15.0  # seconds without an ack before unacknowledged entries are sent again in the same session


class _Stopped(Exception):
    """Ends a session's task group after a graceful stop."""


class Agent:
    def __init__(self, config: AgentConfig, *, transport: Transport | None = None,
                 telemetry: TelemetrySource | None = None, clock_ms: Callable[[], int] = now_ms,
                 extra_executors: dict[str, Executor] | None = None, speed: float = 1.0,
                 enroll_transport: Transport | None = None) -> None:
        self.config = config
        self.clock_ms = clock_ms
        self.identity = Identity.open(config.data, config.node_id, config.fleet)
        self.profile: Profile = load_profile(config.profile, config.profiles_dir)
        slots = config.max_concurrent or self.profile.max_concurrent
        # Room kept for the largest result of every slot: accepted work can always report.
        self.outbox = Outbox(config.data / "outbox.sqlite", config.outbox_max_bytes,
                             reserve_bytes=slots * (config.max_step_bytes + 1024))
        enroll_login = config.enroll_login_settings()
        own_login = (config.own_login_settings(self.identity.broker_password()) if enroll_login is not None
                     else config.broker_settings())
        self.transport = transport or MqttTransport(own_login)
        # With an enrollment login: where the node asks to enroll while the broker refuses its own login.
        self.enroll_transport = enroll_transport or (MqttTransport(enroll_login) if enroll_login is not None else None)
        self.telemetry = telemetry or PsutilSource(str(config.data))
        if config.telemetry_file:
            self.telemetry = OverlaySource(self.telemetry, config.telemetry_file)
        hb, tel = self.identity.intervals()
        policy = ExecutorPolicy(shell=config.shell, shell_allow=config.shell_allow, python=config.python,
                                python_allow=config.python_allow, extra=dict(extra_executors or {}),
                                **update_executors(config, self.identity.key, lambda: self.trusted_hub_keys))
        executors, disabled = build_executors(policy)
        self.runner = Runner(self.outbox, executors, disabled, slots, clock_ms, self._wake_flusher, config.max_step_bytes, speed)
        profile = self.profile
        facts = NodeFacts(profile.name, __version__, {**profile.labels, **config.labels},
                          tuple(sorted({*profile.capabilities, *self.runner.executors})), slots, profile.resources())
        hub = HubTrust(self._choose_hub_key(), self.identity.hub_next_key, self._restore_hub_window())
        self.protocol = AgentProtocol(
            self.identity.key, config.fleet, config.node_id, boot=self.identity.boot, hub=hub, facts=facts,
            intervals=(float(hb or config.heartbeat or profile.heartbeat_s),
                       float(tel or config.telemetry or profile.telemetry_s)),
            enrolled=self.identity.enrolled, enroll_token=config.enroll_token)
        self.session: Session | None = None
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self._flush_wake = asyncio.Event()
        self._ack_seen = asyncio.Event()
        self._interval_changed = {"hb": asyncio.Event(), "tel": asyncio.Event()}
        self._enrolled = asyncio.Event()
        self._hub_key_known = asyncio.Event()
        if self.protocol.enrolled:
            self._enrolled.set()
        if self.hub_key:
            self._hub_key_known.set()
        # On the agent's clock, not the machine's: a simulation on virtual time throttles the same way.
        self._refusals = ThrottledLog(log, interval=60.0, clock=lambda: self.clock_ms() / 1000)
        self._publishing: set[asyncio.Task[None]] = set()
        self._hub_state_now = asyncio.Event()   # a hub state arrived in this session

    # -- what tests and the simulator read ---------------------------------------------------------------------------

    @property
    def receiver(self) -> Receiver:
        return self.protocol.receiver

    @property
    def hub_key(self) -> bytes | None:
        return self.protocol.hub_key

    @property
    def trusted_hub_keys(self) -> tuple[bytes, ...]:
        """The pinned hub key, and the next one a hub key rotation announced: what artifact manifests may be
        signed with."""
        return tuple(k for k in (self.protocol.hub_key, self.protocol.hub_next_key) if k)

    @property
    def rejected(self) -> collections.Counter[str]:
        """Refused messages by reason (heartbeats report them)."""
        return self.protocol.rejected

    @property
    def hb_interval(self) -> float:
        return self.protocol.hb_interval

    @property
    def tel_interval(self) -> float:
        return self.protocol.tel_interval

    # -- setup -----------------------------------------------------------------------------------------------------

    def _choose_hub_key(self) -> bytes | None:
        given, pinned = self.config.hub_key, self.identity.hub_key
        if given and pinned and given != pinned:
            if given in self.identity.hub_retired_keys:
                # The hub rotated away from the configured key, announcing the pinned one with it: keep following.
                log.info("the configured hub key (kid %s) was rotated: the hub announced kid %s with it and signs with "
                         "that now; following it (configure --hub-key %s to match)", kid_for(given).hex(),
                         kid_for(pinned).hex(), pinned.hex())
                return pinned
            if given == self.identity.hub_next_key:  # configured ahead of the switch: what the hub announced
                self.identity.switch_hub_key(given)
                return given
            log.warning("the configured hub key differs from the one pinned earlier (and from every key the hub "
                        "rotated through); using the configured key")
        if given:
            if given != pinned:
                self.identity.pin_hub_key(given)
            return given
        if pinned is None and not self.config.trust_first_hub_key:
            raise ConfigError("no hub key: give --hub-key with the hub's public key, in hex or a file (on the hub "
                              "machine, `hub identity` with the hub's --data directory prints it), or "
                              "--trust-first-hub-key to pin the first hub seen (insecure)")
        return pinned

    def _restore_hub_window(self) -> ReplayWindow | None:
        """The replay window of hub commands, as the last run left it. An unreadable row never stops the agent:
        it falls back to the separately kept high-water mark (refusing everything at or below it), and says so."""
        try:
            saved = self.outbox.load_state("hub_window", legacy_tags=True)
            if saved is None:
                return None
            window = ReplayWindow.from_dict(saved)
        except (ProtocolError, KeyError, TypeError, ValueError, AttributeError) as exc:
            mark = None
            with contextlib.suppress(ProtocolError, TypeError, ValueError):
                raw = self.outbox.load_state("hub_mark")
                mark = (int(raw[0]), int(raw[1])) if isinstance(raw, list) and len(raw) == 2 else None
            if mark is None:
                log.error("the saved replay window of hub commands is unreadable (%s) and no high-water mark "
                          "survives: starting a fresh window (commands still expire after their ttl)", exc)
                return None
            log.error("the saved replay window of hub commands is unreadable (%s): refusing every hub command at or "
                      "below boot %d seq %d and starting a fresh window above it", exc, *mark)
            window = ReplayWindow.fenced(*mark)
        self._save_hub_window(window)  # also rewrites a window an earlier version stored as a CBOR bignum
        return window

    def _save_hub_window(self, window: ReplayWindow) -> None:
        self.outbox.save_state({"hub_window": window.to_dict(), "hub_mark": [window.boot, window.top]})

    def _wake_flusher(self) -> None:
        self._flush_wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def stop(self) -> None:
        """Request a graceful stop (what SIGTERM does)."""
        self._stop_requested.set()

    # -- the outer loop --------------------------------------------------------------------------------------------

    async def run(self, first_connection_required: bool = False) -> None:
        """Connect and serve until `stop()`. With `first_connection_required` (the agent process), a first
        connection that fails raises `StartupError` instead of being retried: at start a wrong URL or password is
        likelier than an outage, and the service manager restarts a process that exits. Later losses are retried."""
        recovered = self.runner.recover()
        if recovered:
            log.warning("reported %d attempt(s) interrupted by the last stop as failed", len(recovered))
        telemetry = asyncio.create_task(self._telemetry_loop(), name="telemetry")
        failures: list[BaseException] = []
        # Crash-only across sessions too: the telemetry loop failing stops the agent (agent/daemon.py exits 70).
        telemetry.add_done_callback(lambda task: self._background_failed(task, failures))
        # Seeded per node and start: nodes still spread out, and a simulation replays the same delays.
        backoff = Backoff(rng=random.Random(f"{self.config.node_id}/{self.identity.boot}"))
        connected = False
        try:
            while not self.stopping:
                self.protocol.new_session(self.identity.next_boot())
                failure, entered = await self._connect_and_serve()
                if entered:
                    connected = True
                    backoff.reset()
                asked = False
                if failure is not None and not entered and self.enroll_transport is not None and not self.stopping:
                    refused = await self._ask_over_enroll_login()
                    if self.stopping:  # a stop cut the request short
                        break
                    if refused is None:
                        asked = connected = True  # the broker is there, and waits for the hub
                    elif first_connection_required and not connected:
                        raise self._enroll_login_failed(refused)
                if failure is not None:
                    if first_connection_required and not connected and not self.stopping:
                        raise broker_unreachable(self.config.broker, failure)
                    # Refused while the hub has not set up this node's login: the request's own line says so.
                    (log.debug if asked else log.warning)("broker connection: %s", failure)
                if self.stopping:
                    break
                delay = backoff.next()
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(delay, self._stop_requested.wait())
            if not self._stopped:  # stopped while offline: still let running steps finish into the outbox
                await self.runner.drain_and_stop(self.config.grace_period)
        finally:
            telemetry.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # its failure is raised below
                await telemetry
            self.outbox.close()
            self.identity.close()
        if failures:
            raise failures[0]

    async def _connect_and_serve(self) -> tuple[TransportError | None, bool]:
        """One connection, served until it ends: (the transport's error if it failed, whether it was made). A stop
        asked before the session serves (connecting, or waiting for the broker to confirm our subscriptions) ends
        the attempt at once (`_unless_stopped`); from then on the stop is graceful (`_watch_stop`)."""
        will = self.protocol.death_certificate(self.clock_ms(), "lost")
        entered = False

        async def attempt() -> TransportError | None:
            nonlocal entered
            failure: TransportError | None = None
            try:
                async with self.transport.connect(session_client_id(self.config.node_id),
                                                  Will(will.topic, will.payload, qos=1)) as session:
                    entered = True
                    await self._session(session)
            except* TransportError as group:
                failure = group.exceptions[0]  # type: ignore[assignment]
            except* _Stopped:
                pass
            finally:
                self.session = None
            return failure

        # `_session` sets `self.session` once subscribed, just before it starts `_watch_stop`: no await in between.
        return await self._unless_stopped(attempt(), lambda: self.session is None), entered

    async def _unless_stopped(self, work: Coroutine[Any, Any, T], cancellable: Callable[[], bool] = lambda: True
                              ) -> T | None:
        """`work`'s result, or None if a stop was asked while `cancellable()` held: then `work` is cancelled. A
        broker that accepts TCP and stays silent would otherwise hold a stop for the transport's whole timeout (10
        s, as long as `docker stop` waits before SIGKILL)."""
        task = asyncio.create_task(work)
        stop = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and cancellable():
                task.cancel()
            await asyncio.wait({task})
        except asyncio.CancelledError:  # this agent cancelled (a simulated power cut): so is `work`, awaited
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            stop.cancel()
        return None if task.cancelled() else task.result()

    def _background_failed(self, task: asyncio.Task[None], failures: list[BaseException]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            failures.append(error)
            log.critical("the agent's %s loop failed (%s: %s): stopping", task.get_name(), type(error).__name__, error)
            self.stop()

    async def _session(self, session: Session) -> None:
        await session.subscribe(self.protocol.cmd_topic, qos=1)
        await session.subscribe(self.protocol.hub_state_topic, qos=1)
        self.session = session
        self._hub_state_now.clear()
        log.info("connected as %s boot %d", self.config.node_id, self.protocol.boot)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._reader(session), name="reader")
            group.create_task(self._start(session, group), name="start")
            group.create_task(self._watch_stop(session), name="stop")

    async def _start(self, session: Session, group: asyncio.TaskGroup) -> None:
        await self._enroll(session)
        # The retained hub state comes right after our subscribe: waiting a moment for it lets the birth answer
        # it, so its arrival does not ask for a second birth. An absent hub costs only this wait.
        with contextlib.suppress(asyncio.TimeoutError):
            await within(HUB_STATE_WAIT_S, self._hub_state_now.wait())
        await self._publish_birth(session)
        group.create_task(self._heartbeat_loop(session), name="heartbeat")
        group.create_task(self._flusher(session), name="flusher")

    async def _publish_birth(self, session: Session) -> None:
        birth = self.protocol.birth(self.runner.running_refs(), self.outbox.depth(), self.clock_ms())
        await self._publish(session, birth, qos=1)

    async def _publish(self, session: Session, out: Outgoing, qos: int) -> None:
        await session.publish(out.topic, out.payload, qos=qos)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._publishing.add(task)
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        self._publishing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("publish failed (the entry stays in the outbox): %s", task.exception())

    # -- enrollment ------------------------------------------------------------------------------------------------

    async def _enroll(self, session: Session) -> None:
        if self._enrolled.is_set():
            return
        backoff = Backoff(1.0, 60.0, rng=random.Random(f"{self.config.node_id}/{self.protocol.boot}/enroll"))
        log.info("asking the hub to enroll node %s with kid %s%s", self.config.node_id, self.protocol.kid.hex(),
                 " (with the enroll token's proof)" if self.protocol.enroll_proof else "")
        while not self._enrolled.is_set():
            if not self._hub_key_known.is_set():
                log.info("waiting for the hub's state message to learn its key (no --hub-key given)")
                await self._hub_key_known.wait()
            await self._publish(session, self.protocol.enroll_request(self.clock_ms()), qos=1)
            with contextlib.suppress(asyncio.TimeoutError):
                await within(backoff.next(), self._enrolled.wait())
        log.info("enrolled with the hub")

    async def _ask_over_enroll_login(self) -> TransportError | None:
        """The broker refused this node's own login: the hub has not set it up yet (the node is new or pending, or
        the hub lost the password), or an operator revoked the node. Ask to enroll over the shared enrollment login,
        whose ACL lets it publish enroll requests and nothing else, with the password this node logs in with: once
        the hub accepts the key, it gives the broker that login. No Last Will: that login may not publish one."""
        assert self.enroll_transport is not None
        request = self.protocol.enroll_request(self.clock_ms(), self.identity.broker_password())
        enroll_transport = self.enroll_transport

        async def ask() -> TransportError | None:
            try:
                async with enroll_transport.connect(session_client_id(self.config.node_id), None) as session:
                    await self._publish(session, request, qos=1)
            except TransportError as exc:
                return exc
            return None

        refused = await self._unless_stopped(ask())
        if refused is not None or self.stopping:  # stopping: the request may have been cut short, no line about it
            return refused
        self._refusals.warning(("login", "refused"), f"the broker refuses this node's own login ({self.config.node_id}"
                               f"): asked the hub over the enrollment login to enroll kid {self.protocol.kid.hex()} "
                               f"and set up that login; the node connects once the hub accepts it")
        return None

    def _enroll_login_failed(self, error: TransportError) -> StartupError:
        cause = str(error.__cause__ or error)
        if not cause.startswith("[code:"):  # no broker answered: the URL, port or TLS settings
            return broker_unreachable(self.config.broker, error)
        return StartupError(f"the broker at {self.config.broker} (--broker) refused this node's own login and the "
                            f"enrollment login {self.config.enroll_username!r}: {cause}; check enroll_username and "
                            f"FLEETFLOW_ENROLL_PASSWORD")

    # -- receiving: the protocol decides, the shell applies ---------------------------------------------------------

    async def _reader(self, session: Session) -> None:
        async for topic, payload in session.messages():
            self._apply(self.protocol.receive(topic, payload, self.clock_ms()))

    def _on_hub_state(self, topic: str, payload: bytes) -> None:
        self._apply(self.protocol.receive(topic, payload, self.clock_ms()))

    def _apply(self, outputs: Iterable[Output]) -> None:
        for out in outputs:
            match out:
                case RunAssign(assign):
                    reason = self.runner.assign(assign)
                    if reason:
                        log.info("refused step %s of run %s (attempt %s): %s", assign.step, assign.run,
                                 assign.attempt, reason)
                case CancelAttempts(refs, reason):
                    self.runner.cancel(refs, reason)
                case SetDrain(on):
                    self.runner.draining = on
                case SetIntervals(hb, tel):
                    self.identity.save_intervals(hb, tel)
                    for event in self._interval_changed.values():
                        event.set()
                case Acked(eids):
                    self.outbox.remove(eids)
                    self._ack_seen.set()
                case SaveHubWindow(window):
                    self._save_hub_window(window)
                case Refused() | Ignored():
                    self._log_refusal(out)
                case PinHubKey() | SwitchHubKey() | TrustNextHubKey():
                    self._keep_hub_key(out)
                case Enrolled() | EnrollRefused():
                    self._on_enroll_verdict(out)
                case HubSeen(online):
                    self._hub_state_now.set()
                    log.info("hub is %s", "online" if online else "offline")
                case PublishBirth(why):
                    session = self.session
                    if session is not None:  # no session: the next one's first birth answers it
                        log.info("publishing a new birth: %s", why)
                        self._spawn(self._publish_birth(session))

    def _log_refusal(self, out: Refused | Ignored) -> None:
        if isinstance(out, Ignored):
            log.debug("ignored %s", out.detail)
        elif out.source == "cmd":
            self._refusals.warning(("cmd", out.reason), f"refused a command: {out.reason}: {out.detail}")
        else:
            hint = (" (if the hub rotated its key while this node was away, configure --hub-key with the key that "
                    "`hub identity` prints on the hub machine)" if out.reason == "unknown-key" else "")
            self._refusals.warning(("hub_state", out.reason),
                                   f"refused a hub state message: {out.reason}: {out.detail}{hint}")

    def _keep_hub_key(self, out: PinHubKey | SwitchHubKey | TrustNextHubKey) -> None:
        """Persists a hub key decision, so a restart (even with the old --hub-key) trusts what this run trusted."""
        if isinstance(out, PinHubKey):
            log.warning("TRUST ON FIRST USE: pinned hub key %s from the first hub state seen on the broker; "
                        "whoever published it now commands this node. Check it against the public key that "
                        "`hub identity` prints on the hub machine, and configure --hub-key", out.key.hex())
            self.identity.pin_hub_key(out.key)
            self._hub_key_known.set()
        elif isinstance(out, SwitchHubKey):
            self.identity.switch_hub_key(out.key)
            log.info("the hub switched to its next key kid %s; kid %s is retired and no longer trusted",
                     kid_for(out.key).hex(), kid_for(out.retired).hex())
        else:
            self.identity.announce_hub_key(out.key)
            log.info("the hub announced its next key kid %s (signed by kid %s, which this node trusts): trusting it "
                     "too", kid_for(out.key).hex(), kid_for(out.signed_by).hex())

    def _on_enroll_verdict(self, out: Enrolled | EnrollRefused) -> None:
        node, kid = self.config.node_id, out.kid.hex()
        if isinstance(out, Enrolled):
            self.identity.set_enrolled(True)
            self._enrolled.set()
        elif out.verdict == "pending":
            # No command to paste here: only the hub knows how its CLI reaches it; its log prints the whole command.
            log.info("waiting for an operator to accept node %s with kid %s (the hub's log prints the command)", node,
                     kid)
        elif out.verdict == "taken":
            log.error("the hub refused this node's enrollment: node id %s is taken, it is enrolled with another key "
                      "(this node's kid is %s); use another --node-id, or have an operator re-key the node on the hub "
                      "(revoke it, then add this node's public key %s); it keeps asking", node, kid,
                      self.identity.public_key.hex())
        elif out.verdict == "rejected":
            log.error("the hub rejected this node's enrollment (an operator rejected or revoked node %s, kid %s); "
                      "it keeps asking", node, kid)

    # -- periodic work ---------------------------------------------------------------------------------------------

    async def _sleep_interval(self, which: str, seconds: float) -> None:
        """Sleep one interval; a config command that changes it ends the sleep early."""
        changed = self._interval_changed[which]
        with contextlib.suppress(asyncio.TimeoutError):
            await within(seconds, changed.wait())
        changed.clear()

    def _load(self) -> Load:
        return Load(len(self.runner.running), self.runner.free_slots(), self.outbox.depth(),
                    self.outbox.counter("shed"), self.runner.draining)

    def heartbeat(self) -> Heartbeat:
        return self.protocol.heartbeat_body(self._load())

    async def _heartbeat_loop(self, session: Session) -> None:
        """Fixed rate: the next heartbeat is due one interval after the previous one was due, not after it was
        sent, so publishing time does not stretch the period the hub's liveness checks count on."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        interval = self.hb_interval
        while True:
            await self._publish(session, self.protocol.heartbeat(self._load(), self.clock_ms()), qos=0)
            if self.hb_interval != interval:
                interval, due = self.hb_interval, loop.time()
            due += interval
            await self._sleep_interval("hb", max(0.0, due - loop.time()))

    async def _telemetry_loop(self) -> None:
        """Runs across sessions: samples taken while offline wait in the outbox (sheddable)."""
        while True:
            await self._sleep_interval("tel", self.tel_interval)
            metrics = self.telemetry.sample()
            at = self.clock_ms()
            session = self.session
            if session is not None:
                try:
                    await self._publish(session, self.protocol.telemetry(metrics, at), qos=0)
                    continue
                except TransportError:
                    pass
            try:
                self.outbox.add_telemetry({"metrics": metrics, "at": at}, at)
            except sqlite3.Error as exc:  # disk full or read-only: telemetry is the first thing given up
                self._refusals.warning(("telemetry", "disk"), f"telemetry sample dropped: the outbox cannot keep it "
                                                             f"({exc})")
                continue
            self._wake_flusher()

    async def _flusher(self, session: Session) -> None:
        """Sends outbox entries in order; resends unacknowledged ones after a new session or RESEND_AFTER seconds."""
        cursor = 0
        while True:
            entries = self.outbox.pending(cursor)
            if not entries:
                self._flush_wake.clear()
                try:
                    await within(RESEND_AFTER, self._flush_wake.wait())
                except asyncio.TimeoutError:
                    cursor = 0  # nothing new for a while: send what is still unacknowledged again
                continue
            if any(entry.kind == "evt" for entry in entries):
                self.outbox.sync()  # one fsync for the batch, before anything in it leaves the device
            for entry in entries:
                now = self.clock_ms()
                if entry.kind == "tel":
                    out, qos = self.protocol.telemetry(entry.body["metrics"], now, entry.body.get("at")), 0
                else:
                    out, qos = self.protocol.outbox_entry(entry.type, entry.body, entry.eid, now), 1
                # Not awaited: the client sends in call order, and an entry is deleted on the hub's ack, not on
                # the broker's PUBACK, so waiting would only add a round trip between a step's events.
                self._spawn(self._publish(session, out, qos=qos))
            self.outbox.remove([e.eid for e in entries if e.kind == "tel"])
            cursor = entries[-1].eid

    # -- stopping --------------------------------------------------------------------------------------------------

    async def _watch_stop(self, session: Session) -> None:
        await self._stop_requested.wait()
        log.info("stopping: no new work, %d running step(s) get %.0f s", len(self.runner.running),
                 self.config.grace_period)
        await self.runner.drain_and_stop(self.config.grace_period)
        loop = asyncio.get_running_loop()  # the loop's clock, so a simulation on virtual time waits virtually
        deadline = loop.time() + ACK_WAIT_ON_STOP
        while self._unacked_events() and loop.time() < deadline:
            self._ack_seen.clear()
            self._wake_flusher()
            with contextlib.suppress(asyncio.TimeoutError):
                await within(max(0.05, deadline - loop.time()), self._ack_seen.wait())
        # Death last: the hub must not move steps whose results are about to arrive.
        await self._publish(session, self.protocol.death_certificate(self.clock_ms(), "shutdown"), qos=1)
        self._stopped = True
        raise _Stopped()

    def _unacked_events(self) -> bool:
        return self.outbox.unacknowledged() > 0
