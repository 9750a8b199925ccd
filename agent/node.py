"""The agent's session logic: identity, enrollment, birth and death, heartbeats, telemetry, commands, outbox flush.

One `Agent` per device. `run()` connects, and reconnects with exponential backoff and jitter, each session with a
new boot. Before connecting it signs the death certificate (the Last Will) for that boot. `stop()` (SIGTERM) drains:
no new work, running steps get the grace period, results are flushed and acknowledged, then the agent publishes
its own death and disconnects cleanly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from protocols import (HUB_ID, Ack, Assign, Birth, Cancel, Config, Drain, Enroll, Heartbeat, HubState, Keyring,
                       ProtocolError, Receiver, ReplayWindow, Signer, Telemetry, Topic, body_from_map, kid_for)
from protocols.enrollment import enroll_proof

from . import __version__
from .config import AgentConfig, ConfigError
from .executors import Executor, ExecutorPolicy, build_executors
from .identity import Identity
from .outbox import Outbox
from .profiles import Profile, load_profile
from .runner import Runner
from .startup import broker_unreachable
from .telemetry import OverlaySource, PsutilSource, TelemetrySource, now_ms
from .transport import MqttTransport, Session, Transport, TransportError, Will, session_client_id

log = logging.getLogger("fleetflow.agent")

ACK_WAIT_ON_STOP = 5.0
HUB_STATE_WAIT_S = 2.0
RESEND_AFTER = 15.0  # seconds without an ack before unacknowledged entries are sent again in the same session


class Backoff:
    """Exponential backoff with +-20% jitter, so a fleet that lost its broker does not reconnect in lockstep."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, rng: random.Random | None = None) -> None:
        self.initial, self.maximum, self.rng = initial, maximum, rng or random.Random()
        self.current = initial

    def next(self) -> float:
        delay = self.current * self.rng.uniform(0.8, 1.2)
        self.current = min(self.maximum, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.initial


class _Stopped(Exception):
    """Ends a session's task group after a graceful stop."""


class RateLimitedLog:
    """Logs a refused message once per (sender, reason) per interval: an attacker cannot flood the log."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}

    def warning(self, key: tuple[str, str], message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            self._last[key] = now
            log.warning(message)


class Agent:
    def __init__(self, config: AgentConfig, *, transport: Transport | None = None,
                 telemetry: TelemetrySource | None = None, clock_ms: Callable[[], int] = now_ms,
                 extra_executors: dict[str, Executor] | None = None, speed: float = 1.0) -> None:
        self.config = config
        self.clock_ms = clock_ms
        self.identity = Identity.open(config.data, config.node_id, config.fleet)
        self.profile: Profile = load_profile(config.profile, config.profiles_dir)
        slots = config.max_concurrent or self.profile.max_concurrent
        # Room kept for the largest result of every slot: accepted work can always report.
        self.outbox = Outbox(config.data / "outbox.sqlite", config.outbox_max_bytes,
                             reserve_bytes=slots * (config.max_step_bytes + 1024))
        self.transport = transport or MqttTransport(config.broker_settings())
        self.telemetry = telemetry or PsutilSource(str(config.data))
        if config.telemetry_file:
            self.telemetry = OverlaySource(self.telemetry, config.telemetry_file)
        hb, tel = self.identity.intervals()
        self.hb_interval = float(hb or config.heartbeat or self.profile.heartbeat_s)
        self.tel_interval = float(tel or config.telemetry or self.profile.telemetry_s)
        policy = ExecutorPolicy(shell=config.shell, shell_allow=config.shell_allow, python=config.python,
                                python_allow=config.python_allow, extra=dict(extra_executors or {}))
        executors, disabled = build_executors(policy)
        self.runner = Runner(self.outbox, executors, disabled, slots, clock_ms, self._wake_flusher, config.max_step_bytes, speed)
        self.signer = Signer(self.identity.key, config.fleet, config.node_id, boot=self.identity.boot)
        self.hub_key = self._choose_hub_key()
        # The pinned hub key, and during a hub key rotation the next key the hub announced (protocol section 7.2).
        keyring = Keyring([(HUB_ID, k) for k in (self.hub_key, self.identity.hub_next_key) if k])
        window = self._restore_hub_window()
        self.receiver = Receiver(config.fleet, keyring, node_id=config.node_id,
                                 windows={HUB_ID: window} if window else {})
        self.rejected: collections.Counter[str] = collections.Counter()
        self.topics = {kind: Topic.node(config.fleet, config.node_id, kind).value for kind in ("cmd", "enroll")}
        self.hub_state_topic = Topic.hub_state(config.fleet).value
        self.session: Session | None = None
        self._stop_requested = asyncio.Event()
        self._stopped = False
        self._flush_wake = asyncio.Event()
        self._ack_seen = asyncio.Event()
        self._interval_changed = {"hb": asyncio.Event(), "tel": asyncio.Event()}
        self._enrolled = asyncio.Event()
        self._hub_key_known = asyncio.Event()
        if self.identity.enrolled:
            self._enrolled.set()
        if self.hub_key:
            self._hub_key_known.set()
        self._refusals = RateLimitedLog()
        self._publishing: set[asyncio.Task[None]] = set()
        # Rebirth (protocol section 8a): the newest hub state seen, and the one our last birth answered.
        self._hub_seen: tuple[int, int] | None = None
        self._hub_state_now = asyncio.Event()   # a hub state arrived in this session
        self._birth_for: tuple[int, int] | None = None
        self._birth_sent = False

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
        backoff = Backoff()
        connected = False
        try:
            while not self.stopping:
                boot = self.identity.next_boot()
                self.signer.new_boot(boot)
                will = self.signer.death_certificate(self.clock_ms(), "lost")
                failure: TransportError | None = None
                try:
                    async with self.transport.connect(session_client_id(self.config.node_id),
                                                      Will(will.topic, will.payload, qos=1)) as session:
                        connected = True
                        backoff.reset()
                        await self._session(session)
                except* TransportError as group:
                    failure = group.exceptions[0]  # type: ignore[assignment]
                except* _Stopped:
                    pass
                finally:
                    self.session = None
                if failure is not None:
                    if first_connection_required and not connected and not self.stopping:
                        raise broker_unreachable(self.config.broker, failure)
                    log.warning("broker connection: %s", failure)
                if self.stopping:
                    break
                delay = backoff.next()
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), delay)
            if not self._stopped:  # stopped while offline: still let running steps finish into the outbox
                await self.runner.drain_and_stop(self.config.grace_period)
        finally:
            telemetry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await telemetry
            self.outbox.close()
            self.identity.close()

    async def _session(self, session: Session) -> None:
        await session.subscribe(self.topics["cmd"], qos=1)
        await session.subscribe(self.hub_state_topic, qos=1)
        self.session = session
        self._birth_sent = False
        self._hub_state_now.clear()
        log.info("connected as %s boot %d", self.config.node_id, self.signer.boot)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._reader(session), name="reader")
            group.create_task(self._start(session, group), name="start")
            group.create_task(self._watch_stop(session), name="stop")

    async def _start(self, session: Session, group: asyncio.TaskGroup) -> None:
        await self._enroll(session)
        # The retained hub state comes right after our subscribe: waiting a moment for it lets the birth answer
        # it, so its arrival does not ask for a second birth. An absent hub costs only this wait.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._hub_state_now.wait(), HUB_STATE_WAIT_S)
        await self._publish_birth(session)
        group.create_task(self._heartbeat_loop(session), name="heartbeat")
        group.create_task(self._flusher(session), name="flusher")

    async def _publish_birth(self, session: Session) -> None:
        birth = Birth(self.profile.name, __version__, {**self.profile.labels, **self.config.labels},
                      tuple(sorted({*self.profile.capabilities, *self.runner.executors})), self.runner.running_refs(),
                      self.outbox.depth(), self.runner.slots, self.hb_interval, self.tel_interval,
                      self.profile.resources())
        self._birth_for = self._hub_seen
        await self._publish(session, self.signer.seal(birth, self.clock_ms()), qos=1)
        self._birth_sent = True

    def _rebirth(self, why: str) -> None:
        session = self.session
        if session is None or not self._birth_sent:
            return  # the session's first birth is still to come and answers this too
        log.info("publishing a new birth: %s", why)
        self._spawn(self._publish_birth(session))

    async def _publish(self, session: Session, out: Any, qos: int) -> None:
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
        backoff = Backoff(1.0, 60.0)
        config, key = self.config, self.identity.public_key
        # The token never leaves the device: the request carries a MAC bound to this fleet, node id and key.
        proof = enroll_proof(config.enroll_token, config.fleet, config.node_id, key) if config.enroll_token else None
        log.info("asking the hub to enroll node %s with kid %s%s", config.node_id, self.signer.kid.hex(),
                 " (with the enroll token's proof)" if proof else "")
        while not self._enrolled.is_set():
            if not self._hub_key_known.is_set():
                log.info("waiting for the hub's state message to learn its key (no --hub-key given)")
                await self._hub_key_known.wait()
            request = Enroll(key, self.profile.name, {**self.profile.labels, **config.labels}, proof)
            await self._publish(session, self.signer.seal(request, self.clock_ms()), qos=1)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._enrolled.wait(), backoff.next())
        log.info("enrolled with the hub")

    # -- receiving -------------------------------------------------------------------------------------------------

    async def _reader(self, session: Session) -> None:
        async for topic, payload in session.messages():
            if topic == self.hub_state_topic:
                self._on_hub_state(topic, payload)
                continue
            try:
                message = self.receiver.receive(topic, payload, self.clock_ms())
            except ProtocolError as exc:
                self.rejected[exc.reason] += 1
                self._refusals.warning(("cmd", exc.reason), f"refused a command: {exc.reason}: {exc}")
                continue
            self._save_hub_window(self.receiver.windows[HUB_ID])
            self._on_command(message.body)

    def _on_hub_state(self, topic: str, payload: bytes) -> None:
        # The retained state is delivered again on every subscribe, so it is verified but not replay-checked.
        try:
            if self.hub_key is None:  # only with --trust-first-hub-key: without it the agent does not start
                key = self.receiver.hub_key_from_state(topic, payload)
                log.warning("TRUST ON FIRST USE: pinned hub key %s from the first hub state seen on the broker; "
                            "whoever published it now commands this node. Check it against the public key that "
                            "`hub identity` prints on the hub machine, and configure --hub-key", key.hex())
                self.identity.pin_hub_key(key)
                self.hub_key = key
                self.receiver.keyring.add(HUB_ID, key)
                self._hub_key_known.set()
            message, signed_by = self.receiver.open_hub_state(topic, payload)
        except ProtocolError as exc:
            self.rejected[exc.reason] += 1
            hint = (" (if the hub rotated its key while this node was away, configure --hub-key with the key that "
                    "`hub identity` prints on the hub machine)" if exc.reason == "unknown-key" else "")
            self._refusals.warning(("hub_state", exc.reason), f"refused a hub state message: {exc.reason}: {exc}{hint}")
            return
        if not isinstance(message.body, HubState):
            return
        self._follow_hub_keys(signed_by, message.body)
        self._hub_state_now.set()
        log.info("hub is %s", "online" if message.body.online else "offline")
        stamp = (message.header.boot, message.header.seq)
        if message.body.online and (self._hub_seen is None or stamp > self._hub_seen):
            self._hub_seen = stamp
            # A hub that comes (back) online asks every node for a birth, as a Sparkplug host does: it may have
            # missed ours (it restarted, or we reconnected to a restarted broker before it did).
            if self._birth_for is None or stamp > self._birth_for:
                self._rebirth(f"the hub came online (boot {stamp[0]})")

    def _follow_hub_keys(self, signed_by: bytes, state: HubState) -> None:
        """A hub key rotation (protocol section 7.2), from a verified hub state: a state signed by the announced next
        key means the hub switched (the old key is retired, no longer trusted); a next key announced by a key this
        node trusts is trusted too. Both are persisted, so a restart with the old --hub-key keeps following."""
        current = self.hub_key
        if current is not None and signed_by != current:
            self.identity.switch_hub_key(signed_by)
            self.receiver.keyring.remove(kid_for(current))
            self.hub_key = signed_by
            log.info("the hub switched to its next key kid %s; kid %s is retired and no longer trusted",
                     kid_for(signed_by).hex(), kid_for(current).hex())
        announced = state.next_key
        if announced is None or announced == self.hub_key or announced == self.identity.hub_next_key:
            return
        superseded = self.identity.hub_next_key  # only the newest announcement of the current key counts
        if superseded is not None:
            self.receiver.keyring.remove(kid_for(superseded))
        self.identity.announce_hub_key(announced)
        self.receiver.keyring.add(HUB_ID, announced)
        log.info("the hub announced its next key kid %s (signed by kid %s, which this node trusts): trusting it too",
                 kid_for(announced).hex(), kid_for(signed_by).hex())

    def _on_command(self, body: Any) -> None:
        if isinstance(body, Assign):
            reason = self.runner.assign(body)
            if reason:
                log.info("refused step %s of run %s (attempt %s): %s", body.step, body.run, body.attempt, reason)
        elif isinstance(body, Ack):
            if body.eids:
                self.outbox.remove(body.eids)
                self._ack_seen.set()
            if body.enroll is not None:
                self._on_enroll_verdict(body.enroll, body.kid)
        elif isinstance(body, Cancel):
            self.runner.cancel(body.attempts, body.reason)
        elif isinstance(body, Drain):
            self.runner.draining = body.on
        elif isinstance(body, Config):
            if body.rebirth:
                self._rebirth("the hub asked for it (it does not hold this node online)")
            self.hb_interval = body.hb or self.hb_interval
            self.tel_interval = body.tel or self.tel_interval
            self.identity.save_intervals(self.hb_interval, self.tel_interval)
            for event in self._interval_changed.values():
                event.set()

    def _on_enroll_verdict(self, verdict: str, kid: bytes | None) -> None:
        mine = self.signer.kid
        if kid is not None and kid != mine:
            # Another process asked for this node id with another key; the verdict is about that key, not ours.
            log.debug("ignored an enroll verdict (%s) about kid %s", verdict, kid.hex())
            return
        node = self.config.node_id
        if verdict == "accepted":
            if not self._enrolled.is_set():
                self.identity.set_enrolled(True)
                self._enrolled.set()
        elif verdict == "pending" and not self._enrolled.is_set():
            # No command to paste here: only the hub knows how its CLI reaches it; its log prints the whole command.
            log.info("waiting for an operator to accept node %s with kid %s (the hub's log prints the command)", node,
                     mine.hex())
        elif verdict == "taken":
            log.error("the hub refused this node's enrollment: node id %s is taken, it is enrolled with another key "
                      "(this node's kid is %s); use another --node-id, or have an operator re-key the node on the hub "
                      "(revoke it, then add this node's public key %s); it keeps asking", node, mine.hex(),
                      self.identity.public_key.hex())
        elif verdict == "rejected":
            log.error("the hub rejected this node's enrollment (an operator rejected or revoked node %s, kid %s); "
                      "it keeps asking", node, mine.hex())

    # -- periodic work ---------------------------------------------------------------------------------------------

    async def _sleep_interval(self, which: str, seconds: float) -> None:
        """Sleep one interval; a config command that changes it ends the sleep early."""
        changed = self._interval_changed[which]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(changed.wait(), seconds)
        changed.clear()

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(len(self.runner.running), self.runner.free_slots(), self.outbox.depth(),
                         self.outbox.counter("shed"), dict(self.rejected), self.runner.draining)

    async def _heartbeat_loop(self, session: Session) -> None:
        """Fixed rate: the next heartbeat is due one interval after the previous one was due, not after it was
        sent, so publishing time does not stretch the period the hub's liveness checks count on."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        interval = self.hb_interval
        while True:
            await self._publish(session, self.signer.seal(self.heartbeat(), self.clock_ms()), qos=0)
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
                    await self._publish(session, self.signer.seal(Telemetry(metrics), at), qos=0)
                    continue
                except TransportError:
                    pass
            self.outbox.add_telemetry({"metrics": metrics, "at": at}, at)
            self._wake_flusher()

    async def _flusher(self, session: Session) -> None:
        """Sends outbox entries in order; resends unacknowledged ones after a new session or RESEND_AFTER seconds."""
        cursor = 0
        while True:
            entries = self.outbox.pending(cursor)
            if not entries:
                self._flush_wake.clear()
                try:
                    await asyncio.wait_for(self._flush_wake.wait(), RESEND_AFTER)
                except asyncio.TimeoutError:
                    cursor = 0  # nothing new for a while: send what is still unacknowledged again
                continue
            if any(entry.kind == "evt" for entry in entries):
                self.outbox.sync()  # one fsync for the batch, before anything in it leaves the device
            for entry in entries:
                if entry.kind == "tel":
                    body: Any = Telemetry(entry.body["metrics"], entry.body.get("at"))
                    qos = 0
                else:
                    body = body_from_map(entry.type, {**entry.body, "eid": entry.eid})
                    qos = 1
                # Not awaited: the client sends in call order, and an entry is deleted on the hub's ack, not on
                # the broker's PUBACK, so waiting would only add a round trip between a step's events.
                self._spawn(self._publish(session, self.signer.seal(body, self.clock_ms()), qos=qos))
            self.outbox.remove([e.eid for e in entries if e.kind == "tel"])
            cursor = entries[-1].eid

    # -- stopping --------------------------------------------------------------------------------------------------

    async def _watch_stop(self, session: Session) -> None:
        await self._stop_requested.wait()
        log.info("stopping: no new work, %d running step(s) get %.0f s", len(self.runner.running),
                 self.config.grace_period)
        await self.runner.drain_and_stop(self.config.grace_period)
        deadline = time.monotonic() + ACK_WAIT_ON_STOP
        while self._unacked_events() and time.monotonic() < deadline:
            self._ack_seen.clear()
            self._wake_flusher()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ack_seen.wait(), max(0.05, deadline - time.monotonic()))
        # Death last: the hub must not move steps whose results are about to arrive.
        await self._publish(session, self.signer.death_certificate(self.clock_ms(), "shutdown"), qos=1)
        self._stopped = True
        raise _Stopped()

    def _unacked_events(self) -> bool:
        return self.outbox.unacknowledged() > 0

