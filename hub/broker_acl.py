"""Least privilege at the broker: a fleet's Mosquitto dynamic-security roles, and the hub's own session that gives
each accepted node a broker login of its own and takes it away when the node is revoked or deleted.

Roles (docs/operations.md, "Least privilege on the broker"). Mosquitto 2.0's dynamic-security plugin substitutes no
`%u` or `%c` in ACL topics, so a node's own topics are written into a role of its own, made with its login:

    hub@F          read node/+/{enroll,birth,death,hb,tel,evt} (also as $share/fleetflow-hub/..., --ingest-workers);
                   write node/+/cmd, hub/state, json/# (--json-mirror)
    node@F         read hub/state (every node)
    node@F:ID      write node/ID/{enroll,birth,death,hb,tel,evt}; read node/ID/cmd (node ID only)
    enroll@F       write node/+/enroll, nothing else, read nothing (devices not enrolled yet, one shared login)
    admin@F        the plugin's control topic (the hub's session below)

With Sparkplug (`SparkplugAccess`: group G, edge node E, host application H; topics under spBv1.0/, hub/sparkplug/):

    hub@F          also write G/{NBIRTH,NDATA,NDEATH}/E, G/{DBIRTH,DDATA,DDEATH}/E/+; read G/NCMD/E, G/DCMD/E/+, STATE/+
    scada@F        write G/NCMD/E, G/DCMD/E/+, STATE/H; read G/#, STATE/H (only with a host application H)

Usernames: a node logs in as its node id; the others are `hub@F`, `enroll@F`, `admin@F` and `scada@F`, which no node
id can take (`@` is not an id character). Nobody but `hub@F` may read enroll topics, so the password a node puts in
its enroll request (docs/protocol.md 7.1) reaches the hub alone. Sparkplug commands are not signed: the ACLs are what
keeps everyone but `scada@F` from draining nodes over DCMD.

The session: `BrokerClients` keeps the latest change wanted per node (log in with a password, enable, disable,
delete) and sends each to `$CONTROL/dynamic-security/v1` over its own MQTT connection with the admin login, one
request at a time, until the broker confirms it. The hub's core loop only records a change and wakes the sender; a
broker that is away or refuses is logged once a minute and retried with backoff. Disabling a client disconnects
every connection using it, and the broker refuses it from then on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.runtime.backoff import Backoff
from agent.runtime.keys import KeyFileError, read_private_text
from agent.runtime.logs import ThrottledLog
from agent.runtime.timeouts import within
from agent.runtime.transport import MqttTransport, Session, Transport, TransportError, session_client_id
from protocols import HUB_ID, FleetflowError, Topic, TopicFilter, check_id

from .ingest import SHARE_GROUP
from .sparkplug.settings import (DEVICE_KINDS, NAMESPACE, NODE_KINDS, check_sparkplug_id, sparkplug_topic,
                                 state_topic)

if TYPE_CHECKING:
    from .service import Hub

log = logging.getLogger("fleetflow.hub.broker")

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
NODE_WRITES = ("enroll", "birth", "death", "hb", "tel", "evt")  # never `cmd`: only the hub commands
REPLY_TIMEOUT_S = 10.0
# Errors that mean the broker already is as wanted: the command is idempotent in effect.
ALREADY = {"createRole": "Role already exists", "createClient": "Client already exists",
           "deleteRole": "Role not found", "deleteClient": "Client not found", "disableClient": "Client not found",
           "enableClient": "Client not found"}


class BrokerAdminError(FleetflowError):
    """The admin login file cannot be used (the message names it)."""


@dataclass(frozen=True)
class BrokerLogin:
    username: str
    password: str = field(repr=False)


def read_login_file(path: str | Path) -> BrokerLogin:
    """A login from a JSON file `{"username": ..., "password": ...}` that only its owner may read."""
    try:
        raw = json.loads(read_private_text(path, "broker login file"))
    except KeyFileError as exc:
        raise BrokerAdminError(str(exc)) from None
    except ValueError as exc:
        raise BrokerAdminError(f"broker login file {path} is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) and raw[k] for k in ("username", "password")):
        raise BrokerAdminError(f"broker login file {path} must hold {{\"username\": ..., \"password\": ...}}")
    return BrokerLogin(raw["username"], raw["password"])


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}


@dataclass(frozen=True, slots=True)
class SparkplugAccess:
    """The Sparkplug topics of a hub run with --sparkplug: its group and edge node id (as `hub run` takes them), and
    the host application given a login of its own, if any. Ids are checked as the hub checks them (ValueError)."""

    group: str
    edge_node: str
    host: str | None = None

    def __post_init__(self) -> None:
        for value in (self.group, self.edge_node, self.host):
            if value is not None:
                check_sparkplug_id(value)

    def topic(self, kind: str, device: str | None = None) -> str:
        return sparkplug_topic(self.group, kind, self.edge_node, device)

    def hub_acls(self) -> list[dict[str, Any]]:
        """The edge node's own messages and its devices'; the commands to it and every host's STATE."""
        writes = [self.topic(kind) for kind in NODE_KINDS] + [self.topic(kind, "+") for kind in DEVICE_KINDS]
        reads = [self.topic("NCMD"), self.topic("DCMD", "+"), state_topic("+")]
        return [_acl("publishClientSend", t) for t in writes] + [_acl("subscribePattern", t) for t in reads]

    def host_acls(self) -> list[dict[str, Any]]:
        """The host application's: commands to this edge node and its devices, its own STATE (retained, and its
        Will); it reads the group, and its own STATE (a host watches it, to publish it again if it was overwritten)."""
        if self.host is None:
            raise ValueError("no host application named (--sparkplug-host)")
        writes = [self.topic("NCMD"), self.topic("DCMD", "+"), state_topic(self.host)]
        reads = [f"{NAMESPACE}/{self.group}/#", state_topic(self.host)]
        return [_acl("publishClientSend", t) for t in writes] + [_acl("subscribePattern", t) for t in reads]


@dataclass(frozen=True, slots=True)
class FleetRoles:
    """The usernames, roles and ACLs of one fleet's broker, as the dynamic-security plugin takes them; with
    `sparkplug`, the hub's Sparkplug topics too, and a login for its host application if it names one."""

    fleet: str
    sparkplug: SparkplugAccess | None = None

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")

    @property
    def hub_username(self) -> str:
        return f"{HUB_ID}@{self.fleet}"

    @property
    def enroll_username(self) -> str:
        return f"enroll@{self.fleet}"

    @property
    def admin_username(self) -> str:
        return f"admin@{self.fleet}"

    @property
    def scada_username(self) -> str:
        """The Sparkplug host application's login (a setup has it only when `sparkplug` names a host)."""
        return f"scada@{self.fleet}"

    @property
    def node_role(self) -> str:
        return f"node@{self.fleet}"

    def own_role(self, node_id: str) -> str:
        return f"node@{self.fleet}:{check_id(node_id, 'node id')}"

    def hub_acls(self) -> list[dict[str, Any]]:
        reads = [_acl("subscribePattern", str(TopicFilter.node_kind(self.fleet, kind))) for kind in NODE_WRITES]
        # `hub run --ingest-workers N` subscribes to the same topics as a shared subscription (hub/ingest/)
        reads += [_acl("subscribePattern", f"$share/{SHARE_GROUP}/{TopicFilter.node_kind(self.fleet, kind)}")
                  for kind in NODE_WRITES]
        return reads + [_acl("publishClientSend", str(TopicFilter.node_kind(self.fleet, "cmd"))),
                        _acl("publishClientSend", Topic.hub_state(self.fleet).value),
                        _acl("publishClientSend", f"fleetflow/v1/{self.fleet}/json/#"),
                        *(self.sparkplug.hub_acls() if self.sparkplug is not None else [])]

    def node_acls(self) -> list[dict[str, Any]]:
        return [_acl("subscribePattern", Topic.hub_state(self.fleet).value)]

    def own_acls(self, node_id: str) -> list[dict[str, Any]]:
        writes = [_acl("publishClientSend", Topic.node(self.fleet, node_id, kind).value) for kind in NODE_WRITES]
        return writes + [_acl("subscribePattern", Topic.node(self.fleet, node_id, "cmd").value)]

    def enroll_acls(self) -> list[dict[str, Any]]:
        return [_acl("publishClientSend", str(TopicFilter.node_kind(self.fleet, "enroll")))]

    @staticmethod
    def admin_acls() -> list[dict[str, Any]]:
        # The plugin's replies are published to the admin like any message: receiving them needs its own ACL.
        return [_acl("publishClientSend", CONTROL_TOPIC), _acl("subscribePattern", RESPONSE_TOPIC),
                _acl("publishClientReceive", RESPONSE_TOPIC)]

    def roles(self) -> dict[str, list[dict[str, Any]]]:
        """The fixed roles by name, each fixed login's named as the login (a node's own is made with its login)."""
        fixed = {self.hub_username: self.hub_acls(), self.node_role: self.node_acls(),
                 self.enroll_username: self.enroll_acls(), self.admin_username: self.admin_acls()}
        if self.sparkplug is not None and self.sparkplug.host is not None:
            fixed[self.scada_username] = self.sparkplug.host_acls()
        return fixed

    def _role(self, name: str, acls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Made if missing, and its ACLs set to these either way (a role left by an older setup is corrected)."""
        return [{"command": "createRole", "rolename": name, "acls": acls},
                {"command": "modifyRole", "rolename": name, "acls": acls}]

    def grant(self, node_id: str, password: str | None) -> list[dict[str, Any]]:
        """The node's login with this password, its roles, enabled. Without a password: enabled, if it exists (its
        password arrives with the node's next enroll request over the enrollment login)."""
        if password is None:
            return [{"command": "enableClient", "username": node_id}]
        roles = [{"rolename": self.node_role, "priority": 1}, {"rolename": self.own_role(node_id), "priority": 0}]
        return [*self._role(self.node_role, self.node_acls()), *self._role(self.own_role(node_id),
                                                                            self.own_acls(node_id)),
                {"command": "createClient", "username": node_id, "password": password, "roles": roles},
                {"command": "modifyClient", "username": node_id, "password": password, "roles": roles},
                {"command": "enableClient", "username": node_id}]

    @staticmethod
    def disable(node_id: str) -> list[dict[str, Any]]:
        return [{"command": "disableClient", "username": node_id}]

    def delete(self, node_id: str) -> list[dict[str, Any]]:
        return [{"command": "deleteClient", "username": node_id},
                {"command": "deleteRole", "rolename": self.own_role(node_id)}]


def failures(commands: list[dict[str, Any]], responses: Any) -> list[str]:
    """What the broker refused, as `command: error`; an error that means "already so" is no failure."""
    if not isinstance(responses, list) or len(responses) != len(commands):
        return [f"unexpected reply {str(responses)[:200]}"]
    out = []
    for command, response in zip(commands, responses):
        error = response.get("error") if isinstance(response, dict) else "no reply"
        if error and ALREADY.get(command["command"]) != error:
            out.append(f"{command['command']}: {error}")
    return out


@dataclass(frozen=True, slots=True)
class Change:
    """The broker login a node should have: `grant` (with its password, or enable it without one), `disable`,
    `delete`."""

    action: str
    password: str | None = field(default=None, repr=False)

    @property
    def outcome(self) -> str:
        """What the hub logs once the broker confirmed it."""
        if self.action == "grant":
            return "set up with its own password and topics, enabled" if self.password else "enabled"
        return "deleted" if self.action == "delete" else "disabled: its connections are closed and it cannot log in"


class BrokerClients:
    """Off (`login` None) it changes nothing, and tells an operator once that nodes send passwords it cannot use."""

    def __init__(self, hub: Hub, login: BrokerLogin | None, transport: Transport | None = None) -> None:
        self.hub, self.login = hub, login
        self.roles = FleetRoles(hub.config.fleet)
        own = hub.transport
        self.transport: Transport | None = None
        if login is not None:
            self.transport = transport or (MqttTransport(replace(own.settings, username=login.username,
                                                                 password=login.password))
                                           if isinstance(own, MqttTransport) else own)
        # The password of each pending request, with the kid it came with: an operator's accept names a kid, and only
        # the password sent with that key may become the node's login. Bounded like the pending requests.
        self._offers: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self.wanted: dict[str, Change] = {}  # the latest change per node that the broker has not confirmed yet
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._replies: dict[str, asyncio.Future[Any]] = {}
        self.log = ThrottledLog(log, clock=lambda: hub.clock() / 1000)

    # -- what node_admin calls, on the core loop: records and wakes, never waits --------------------------------------

    def enroll_answered(self, node_id: str, verdict: str, kid: str, password: str | None) -> None:
        """An enroll request was answered. Its password becomes the node's login if its key is accepted now, or is
        kept for the operator's accept of that kid if it waits; `taken` and `rejected` change no login."""
        if password is None:
            return
        if self.login is None:
            self.log.warning("off", f"node {node_id} sent a broker password (it logs in over an enrollment login), "
                                    f"but this hub manages no broker logins: give it --broker-admin-file")
            return
        if verdict == "accepted":
            self._offers.pop(node_id, None)
            self._want(node_id, Change("grant", password))
        elif verdict == "pending":
            self._offers[node_id] = (kid, password)
            self._offers.move_to_end(node_id)
            while len(self._offers) > self.hub.config.max_pending:
                self._offers.popitem(last=False)

    def accepted(self, node_id: str, kid: str) -> None:
        """An operator accepted (or added) the node with this kid."""
        offer = self._offers.pop(node_id, None)
        if self.login is not None:
            self._want(node_id, Change("grant", offer[1] if offer is not None and offer[0] == kid else None))

    def revoked(self, node_id: str) -> None:
        """Rejected or revoked: its login is disabled, which disconnects it."""
        self._offers.pop(node_id, None)
        if self.login is not None:
            self._want(node_id, Change("disable"))

    def deleted(self, node_id: str) -> None:
        self._offers.pop(node_id, None)
        if self.login is not None:
            self._want(node_id, Change("delete"))

    def _want(self, node_id: str, change: Change) -> None:
        self.wanted.pop(node_id, None)
        self.wanted[node_id] = change  # to the end: the order of the operators' actions
        self._wake.set()

    def commands(self, node_id: str, change: Change) -> list[dict[str, Any]]:
        if change.action == "grant":
            return self.roles.grant(node_id, change.password)
        return self.roles.disable(node_id) if change.action == "disable" else self.roles.delete(node_id)

    # -- the session -----------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if self.transport is None:
            return
        # Nodes refused while the hub was stopped (or whose disable it had not confirmed) are disabled again.
        for doc in self.hub.registry.all():
            if doc.get("state") in ("rejected", "revoked") and doc["id"] not in self.wanted:
                self.wanted[doc["id"]] = Change("disable")
        backoff = Backoff()
        while not stop.is_set():
            try:
                async with self.transport.connect(session_client_id(f"{self.hub.config.fleet}.broker-admin"),
                                                  None) as session:
                    await session.subscribe(RESPONSE_TOPIC, qos=1)
                    reader = asyncio.create_task(self._read(session))
                    try:
                        await self._send_changes(session, stop, backoff)
                    finally:
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError, TransportError):
                            await reader
            except TransportError as exc:
                self.log.warning("session", f"broker admin session: {exc}; node logins wait until it is back")
            for future in self._replies.values():
                future.cancel()
            self._replies.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await within(backoff.next(), stop.wait())

    async def _read(self, session: Session) -> None:
        async for _topic, payload in session.messages():
            try:
                responses = json.loads(payload)["responses"]
                key = responses[0]["correlationData"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue  # a reply to another admin client (mosquitto_ctrl), or not ours
            future = self._replies.pop(key, None) if isinstance(key, str) else None
            if future is not None and not future.done():
                future.set_result(responses)

    async def _send_changes(self, session: Session, stop: asyncio.Event, backoff: Backoff) -> None:
        while not stop.is_set():
            if not self.wanted:
                self._wake.clear()
                waiters = [asyncio.create_task(self._wake.wait()), asyncio.create_task(stop.wait())]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
                continue
            node_id, change = next(iter(self.wanted.items()))
            commands = self.commands(node_id, change)
            refused = await self._request(session, commands)
            if refused:
                self.log.warning(("refused", node_id), f"broker login of node {node_id}: {change.action} refused by "
                                                       f"the broker ({'; '.join(refused)}); retrying")
                if self.wanted.get(node_id) is change:  # others first; this one again after them
                    self._want(node_id, self.wanted.pop(node_id))
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(backoff.next(), stop.wait())
                continue
            backoff.reset()
            if self.wanted.get(node_id) is change:  # not replaced by a newer change meanwhile
                del self.wanted[node_id]
            log.info("broker login of node %s: %s", node_id, change.outcome)

    async def _request(self, session: Session, commands: list[dict[str, Any]]) -> list[str]:
        key = f"fleetflow-{next(self._ids)}"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        try:
            body = {"commands": [{**command, "correlationData": key} for command in commands]}
            await session.publish(CONTROL_TOPIC, json.dumps(body).encode(), qos=1)
            try:
                responses = await within(REPLY_TIMEOUT_S, future)
            except asyncio.TimeoutError:
                # No plugin answers (not loaded, or this login may not use it): the change waits for a new session.
                raise TransportError(f"no reply on {RESPONSE_TOPIC} within {REPLY_TIMEOUT_S:g} s: is the "
                                     f"dynamic-security plugin loaded, and may this login use it?") from None
        finally:
            self._replies.pop(key, None)
        return failures(commands, responses)
