"""Sending and receiving signed messages: `Signer` seals typed bodies, `Receiver` opens, verifies and checks them.

Both are pure: the caller passes the time (`now_ms`) and moves the bytes. The receiver's checks run in the order
docs/protocol.md gives: size, envelope structure, key, signature (bound to the topic), payload schema, topic and
sender agreement, target, expiry, replay.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from . import cbor, envelope
from .errors import (BadSignature, Expired, LocalProtocolError, Malformed, UnknownKey, WrongSender, WrongTarget,
                     WrongTopic)
from .messages import (BODY_TYPES, Body, Death, Enroll, Header, HubState, Message, decode_header, decode_payload,
                       encode_payload)
from .replay import ReplayWindow
from .topics import Topic, check_id

HUB_ID = "hub"  # the sender id the hub signs with; node ids may not take it


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    header: Header


class Signer:
    """Seals messages for one sender (a node or the hub). `boot` and `seq` come from the caller's durable state."""

    def __init__(self, key: nacl.signing.SigningKey, fleet: str, sender: str, boot: int, seq: int = 0) -> None:
        self.key = key
        self.public_key = bytes(key.verify_key)
        self.kid = envelope.kid_for(self.public_key)
        self.fleet = check_id(fleet, "fleet")
        self.sender = check_id(sender, "sender")
        self.boot = boot
        self.seq = seq

    def new_boot(self, boot: int) -> None:
        self.boot, self.seq = boot, 0

    def use_key(self, key: nacl.signing.SigningKey) -> None:
        """Sign with another key from the next message on (a hub key rotation). Boot and seq go on: receivers keep
        one replay window per sender id, whatever key it signs with."""
        self.key = key
        self.public_key = bytes(key.verify_key)
        self.kid = envelope.kid_for(self.public_key)

    def _topic(self, body: Body, dst: str | None) -> str:
        if body.KIND == "state":
            return Topic.hub_state(self.fleet).value
        if body.COMMAND:
            if dst is None:
                raise LocalProtocolError(f"{type(body).__name__} is a command and needs a target node")
            return Topic.node(self.fleet, dst, "cmd").value
        return Topic.node(self.fleet, self.sender, body.KIND).value

    def _seal(self, body: Body, header: Header, topic: str) -> Outgoing:
        payload = cbor.dumps(encode_payload(header, body))
        return Outgoing(topic, envelope.seal(payload, topic, self.key, self.kid), header)

    def seal(self, body: Body, now_ms: int, *, dst: str | None = None, ttl_ms: int | None = None) -> Outgoing:
        """Sign `body` as the next message of this boot. Commands need `dst` and `ttl_ms`."""
        if isinstance(body, Death):
            raise LocalProtocolError("a death certificate is made with death_certificate(), not seal()")
        if body.COMMAND and (dst is None or ttl_ms is None):
            raise LocalProtocolError(f"{type(body).__name__} needs dst and ttl_ms")
        self.seq += 1
        header = Header(body.TYPE, self.fleet, self.sender, self.boot, self.seq, now_ms,
                        dst if body.COMMAND else None, now_ms + ttl_ms if body.COMMAND and ttl_ms is not None else None)
        return self._seal(body, header, self._topic(body, dst))

    def death_certificate(self, now_ms: int, reason: str = "lost") -> Outgoing:
        """The Last Will for the current boot: seq 0, signed before the session starts."""
        return self._seal(Death(reason), Header(Death.TYPE, self.fleet, self.sender, self.boot, 0, now_ms),
                          Topic.node(self.fleet, self.sender, "death").value)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    owner: str
    public_key: bytes


class Keyring:
    """The keys a receiver trusts, by kid. A key belongs to exactly one sender id."""

    def __init__(self, keys: Iterable[tuple[str, bytes]] = ()) -> None:
        self._by_kid: dict[bytes, TrustedKey] = {}
        for owner, public_key in keys:
            self.add(owner, public_key)

    def add(self, owner: str, public_key: bytes) -> bytes:
        check_id(owner, "key owner")
        if len(public_key) != envelope.KEY_SIZE:
            raise LocalProtocolError(f"an Ed25519 public key has {envelope.KEY_SIZE} bytes, got {len(public_key)}")
        kid = envelope.kid_for(public_key)
        self._by_kid[kid] = TrustedKey(owner, bytes(public_key))
        return kid

    def remove(self, kid: bytes) -> None:
        self._by_kid.pop(kid, None)

    def remove_owner(self, owner: str) -> None:
        for kid in [k for k, v in self._by_kid.items() if v.owner == owner]:
            del self._by_kid[kid]

    def get(self, kid: bytes) -> TrustedKey | None:
        return self._by_kid.get(kid)

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self._by_kid.values())

    def __len__(self) -> int:
        return len(self._by_kid)


def _topic_for(header: Header) -> str:
    """The topic a message with this header must have been signed for (None if the header names no valid one)."""
    # The header's ids were validated by decode_header, so the string is built directly (this is on the hot path).
    cls = BODY_TYPES[header.type]
    if cls.KIND == "state":
        return f"fleetflow/v1/{header.fleet}/hub/state"
    node = header.dst if cls.COMMAND else header.src
    return f"fleetflow/v1/{header.fleet}/node/{node}/{cls.KIND}"


def open_envelope(data: bytes, topic: str, public_key: bytes | nacl.signing.VerifyKey,
                  max_size: int = envelope.DEFAULT_MAX_SIZE) -> Message:
    """Stateless check of one envelope against one key: structure, signature, payload, topic agreement.

    This is what the test vectors exercise. `Receiver.receive` adds the keyring, sender, target, expiry and replay.
    """
    parsed = envelope.parse(data, max_size)
    raw_key = bytes(public_key) if isinstance(public_key, nacl.signing.VerifyKey) else public_key
    if type(raw_key) is not bytes or len(raw_key) != envelope.KEY_SIZE:
        raise LocalProtocolError(f"an Ed25519 public key is {envelope.KEY_SIZE} raw bytes or a VerifyKey")
    if parsed.kid != envelope.kid_for(raw_key):
        raise UnknownKey(f"kid {parsed.kid.hex()} does not name this key")
    return _verify_and_decode(parsed, topic, raw_key)


def _verify_and_decode(parsed: envelope.Parsed, topic: str, public_key: bytes) -> Message:
    if not parsed.signed_for(topic, public_key):
        # Authentic but moved? Rebuild the topic the payload claims and check the signature there.
        claimed = _claimed_topic(parsed.payload)
        if claimed is not None and claimed != topic and parsed.signed_for(claimed, public_key):
            raise WrongTopic(f"signed for topic {claimed!r}, received on {topic[:200]!r}") from None
        raise BadSignature("signature does not verify for this topic and key")
    message = decode_payload(cbor.loads(parsed.payload))
    expected = _topic_for(message.header)
    if expected != topic:
        raise WrongTopic(f"a {message.header.type} from {message.header.src!r} belongs on {expected!r}, not {topic[:200]!r}")
    return message


def _claimed_topic(payload: bytes) -> str | None:
    try:
        return _topic_for(decode_header(cbor.loads(payload)))
    except Malformed:
        return None


@dataclass
class Receiver:
    """Opens messages for one party: a node (trusts the hub key) or the hub (trusts enrolled node keys).

    `node_id` is set on a node: commands must then name it as their target. Replay windows are kept per sender and
    exposed as `windows` so the hub can persist them.
    """

    fleet: str
    keyring: Keyring = field(default_factory=Keyring)
    node_id: str | None = None
    max_size: int = envelope.DEFAULT_MAX_SIZE
    windows: dict[str, ReplayWindow] = field(default_factory=dict)

    def receive(self, topic: str, data: bytes, now_ms: int) -> Message:
        """Open, verify and check one message; raises a `RemoteProtocolError` subclass when it must be dropped."""
        message = self.open(topic, data, now_ms)
        if not topic.endswith("/enroll"):
            self.admit(message)
        return message

    def open(self, topic: str, data: bytes, now_ms: int) -> Message:
        """Every check of `receive` but the replay check: what can run in parallel, away from the windows (the hub's
        ingest workers, hub/ingest/). `admit` is the rest, once per message, in the sender's order."""
        parsed = envelope.parse(data, self.max_size)
        if topic.endswith("/enroll"):
            return self._receive_enroll(topic, parsed)
        trusted = self.keyring.get(parsed.kid)
        if trusted is None:
            raise UnknownKey(f"no trusted key has kid {parsed.kid.hex()}")
        message = _verify_and_decode(parsed, topic, trusted.public_key)
        header = message.header
        if header.fleet != self.fleet:
            raise WrongTopic(f"message for fleet {header.fleet!r}, this receiver serves {self.fleet!r}")
        if header.src != trusted.owner:
            raise WrongSender(f"key {parsed.kid.hex()} belongs to {trusted.owner!r}, payload claims {header.src!r}")
        if header.dst is not None:
            if self.node_id is not None and header.dst != self.node_id:
                raise WrongTarget(f"command for node {header.dst!r}, this is {self.node_id!r}")
            if header.exp is not None and now_ms > header.exp:
                raise Expired(f"command expired {now_ms - header.exp} ms ago")
        return message

    def admit(self, message: Message) -> None:
        """The replay check of an opened message, which moves its sender's window (raises `Replayed`)."""
        header = message.header
        window = self.windows.get(header.src)
        if window is None:
            window = self.windows[header.src] = ReplayWindow()
        if isinstance(message.body, Death):
            window.accept_death(header.boot)
        else:
            window.accept(header.boot, header.seq)

    def screen(self, topic: str, data: bytes, verify: bool = False) -> None:
        """The cheap checks of section 4 (size, envelope structure, a trusted kid that belongs to the node the topic
        names), and the signature only when `verify`. A receiver screens before queueing, so traffic that cannot be
        authentic costs no queue space. `receive` still runs every check."""
        parsed = envelope.parse(data, self.max_size)
        if topic.endswith("/enroll"):
            return  # self-signed: nothing to look up before verifying
        trusted = self.keyring.get(parsed.kid)
        if trusted is None:
            raise UnknownKey(f"no trusted key has kid {parsed.kid.hex()}")
        parts = topic.split("/")
        if len(parts) != 6 or parts[4] != trusted.owner:
            raise WrongSender(f"key {parsed.kid.hex()} belongs to {trusted.owner!r}, not to the sender of {topic[:120]}")
        if verify:
            parsed.verify(topic, trusted.public_key)

    def _receive_enroll(self, topic: str, parsed: envelope.Parsed) -> Message:
        """Enroll requests are self-signed: the key inside the payload must be the one that signed it."""
        message = decode_payload(cbor.loads(parsed.payload))
        body = message.body
        if not isinstance(body, Enroll):
            raise WrongTopic(f"a {message.header.type} does not belong on an enroll topic")
        if envelope.kid_for(body.key) != parsed.kid:
            raise BadSignature("enroll request: kid does not match the key it carries")
        _verify_and_decode(parsed, topic, body.key)
        if message.header.fleet != self.fleet:
            raise WrongTopic(f"enroll for fleet {message.header.fleet!r}, this receiver serves {self.fleet!r}")
        return message

    def open_hub_state(self, topic: str, data: bytes) -> tuple[Message, bytes]:
        """A hub state, verified with whichever trusted key of the hub signed it (during a key rotation a node trusts
        the current key and the announced next one). Returns the message and that key. Not replay-checked: the
        retained state is delivered again on every subscribe."""
        parsed = envelope.parse(data, self.max_size)
        trusted = self.keyring.get(parsed.kid)
        if trusted is None:
            raise UnknownKey(f"no trusted key has kid {parsed.kid.hex()}")
        if trusted.owner != HUB_ID:
            raise WrongSender(f"key {parsed.kid.hex()} belongs to {trusted.owner!r}, not to the hub")
        message = _verify_and_decode(parsed, topic, trusted.public_key)
        if not isinstance(message.body, HubState) or message.header.src != HUB_ID:
            raise WrongTopic(f"a {message.header.type} from {message.header.src!r} is not a hub state")
        if message.header.fleet != self.fleet:
            raise WrongTopic(f"hub state for fleet {message.header.fleet!r}, this receiver serves {self.fleet!r}")
        return message, trusted.public_key

    def hub_key_from_state(self, topic: str, data: bytes) -> bytes:
        """For trust on first use: the key a self-signed hub state names, once its signature checks out."""
        parsed = envelope.parse(data, self.max_size)
        raw: Any = cbor.loads(parsed.payload)
        message = decode_payload(raw)
        if not isinstance(message.body, HubState) or message.header.src != HUB_ID:
            raise WrongTopic("not a hub state message")
        if envelope.kid_for(message.body.key) != parsed.kid:
            raise BadSignature("hub state: kid does not match the key it carries")
        _verify_and_decode(parsed, topic, message.body.key)
        return message.body.key
