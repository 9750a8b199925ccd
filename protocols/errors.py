"""The root of every fleetflow error, and the wire protocol's hierarchy under it, split by who caused the problem
(as h11 does). It lives here because protocols/ is the one package every other imports.

`RemoteProtocolError` and its subclasses mean a peer (or an attacker) sent something we refuse; receivers catch
`ProtocolError`, count it by `reason` and drop the message. `LocalProtocolError` means our own code tried to build
something invalid: a bug on our side, never caused by input from the network.
"""

from __future__ import annotations


class FleetflowError(Exception):
    """Root of every error fleetflow raises itself: refused input (the protocol's, an operator's, a setting's), a
    start that cannot go on, and the few checks that name a bug of ours (`IllegalTransition`). Anything else that
    escapes is a bug nobody checked for, and the process stops on it (crash-only)."""


class ProtocolError(FleetflowError):
    """Base class of every protocol error. `reason` is a stable label, used for metrics and test vectors."""

    reason = "protocol-error"


class LocalProtocolError(ProtocolError):
    """We tried to build or send something the protocol does not allow."""

    reason = "local"


class RemoteProtocolError(ProtocolError):
    """A received message was refused."""

    reason = "remote"


class TooLarge(RemoteProtocolError):
    """The message is over the size limit; it was refused before any decoding."""

    reason = "too-large"


class Malformed(RemoteProtocolError):
    """Not a well-formed envelope or payload: bad CBOR, a limit exceeded, a missing or mistyped field."""

    reason = "malformed"


class BadSignature(RemoteProtocolError):
    """The signature does not verify for this topic under the key named by `kid`."""

    reason = "bad-signature"


class UnknownKey(RemoteProtocolError):
    """The `kid` names no key this receiver trusts (not enrolled, revoked, or not the pinned hub key)."""

    reason = "unknown-key"


class WrongSender(RemoteProtocolError):
    """The key is valid but belongs to another sender than the one the payload names."""

    reason = "wrong-sender"


class WrongTopic(RemoteProtocolError):
    """Authentic, but received on another topic than it was signed for, or the payload disagrees with the topic."""

    reason = "wrong-topic"


class WrongTarget(RemoteProtocolError):
    """A hub command addressed to another node than the receiver."""

    reason = "wrong-target"


class Replayed(RemoteProtocolError):
    """An old boot, a sequence number already seen, or one older than the replay window."""

    reason = "replayed"


class Expired(RemoteProtocolError):
    """A command received after its expiry time."""

    reason = "expired"


#: Every reason label a receiver can count, in a stable order (for metrics and heartbeats).
REASONS: tuple[str, ...] = tuple(
    cls.reason
    for cls in (TooLarge, Malformed, BadSignature, UnknownKey, WrongSender, WrongTopic, WrongTarget, Replayed, Expired)
)
