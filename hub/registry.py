"""Enrolled node keys: pending, accepted, rejected, revoked. A small document a person may read (TinyDB, fsync'd).

TinyDB rewrites its whole file on every write, so an enrollment storm (thousands of devices at once) would cost
O(N) per device. Changes are therefore applied in memory and written by `flush()`: the hub flushes once per batch
of messages, before it sends any answer that depends on them.

The enrollment rules live here, as one function of (registry, request, policy), so they can be tested without a
broker:

- the id `hub` is the hub's own sender id: an enroll from it is refused and nothing is stored;
- an id enrolled with one key is never given to another (`taken`); rejected and revoked ids stay refused;
- a pending request whose key changes starts over: an operator accepts a key by its fingerprint (the kid), so an
  accept names exactly the key that was reviewed, never one that replaced it in between;
- pending requests are capped; the oldest is dropped to make room (its agent asks again later);
- an enroll token admits at most `token_uses` enrollments, counted durably by the token's fingerprint (a new
  token starts from zero); a repeated request from an already accepted key uses nothing.

Operators re-key a node (revoke, then `add` the new key), delete one, or accept every pending request at once. The
registry also remembers, per id, which key the hub's replay state (boot and seq high-water mark) was built with,
even across a delete: a new key resets it (the device behind it may count its boots from 1 again), while the same
key coming back keeps it, so nothing captured under that key can be replayed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tinydb import TinyDB

from agent.runtime.storage import DurableJSONStorage
from agent.runtime.logs import ThrottledLog
from protocols import HUB_ID, check_id, kid_for

from .errors import Conflict, NotFound, Unprocessable


log = logging.getLogger("fleetflow.hub")

STATES = ("pending", "accepted", "rejected", "revoked")
DEFAULT_MAX_PENDING: Final = 1_000
# One enrollment per token unless the operator says otherwise: a token that leaks from a device image after it was
# used admits nobody, and the size of a provisioning batch is something only the operator knows.
DEFAULT_TOKEN_USES: Final = 1


class RegistryError(Conflict):
    """An operator request the registry refuses (a conflict with what it holds)."""


class NoSuchNode(RegistryError, NotFound):
    status = NotFound.status


class BadEntry(RegistryError, Unprocessable):
    """An id or key that can never be enrolled (the hub's reserved id, a key of the wrong size)."""

    status = Unprocessable.status


class KeyMismatch(RegistryError):
    """An accept named another key than the one the node asks with now."""


class KeyTaken(RegistryError):
    """An add names another key for an id that is enrolled (accepted) with its own."""


def fingerprint(key: bytes) -> str:
    """What operators compare: the kid of the key (first 8 bytes of SHA-256 of the raw public key), in hex. The
    hub's log, `nodes list/show`, `agent identity` and the agent's own log all print this same string."""
    return kid_for(key).hex()


def token_fingerprint(token: str) -> str:
    """How the registry tells tokens apart without storing one: a hash with its own context string."""
    return hashlib.sha256(b"fleetflow-enroll-token-id\x00" + token.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class EnrollPolicy:
    auto_accept: bool = False
    token: str | None = None  # token_fingerprint() of the hub's enroll token; None: no token configured
    token_uses: int = DEFAULT_TOKEN_USES
    max_pending: int = DEFAULT_MAX_PENDING


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What one enroll request did. `verdict` is the `ack.enroll` answer, or `reserved` (no answer is sent)."""

    verdict: str
    kid: str                        # fingerprint of the key in the request
    new: bool = False               # a new pending entry or a new admission (worth an info line)
    replaced_kid: str = ""          # a pending request changed keys: the kid it had; the request started over
    enrolled_kid: str = ""          # verdict `taken`: the kid the id is enrolled with
    admitted_by: str = ""           # `auto` or `token` when this request accepted the node
    token: str = ""                 # proof presented: `used`, `spent` (valid, no uses left) or `bad`
    token_uses: int = 0             # uses of the token so far, after this request
    dropped: tuple[str, ...] = ()   # pending ids dropped, oldest first, to stay under the cap


class Registry:
    def __init__(self, path: Path) -> None:
        self._db = TinyDB(str(path), storage=DurableJSONStorage)
        self._nodes = self._db.table("nodes")
        self._tokens = self._db.table("tokens")
        self._replay_table = self._db.table("replay")
        self._cache = {doc["id"]: {**doc, "kid": fingerprint(bytes.fromhex(doc["key"]))} for doc in self._nodes.all()}
        self._uses: dict[str, dict[str, Any]] = {doc["id"]: dict(doc) for doc in self._tokens.all()}
        # id -> kid of the key the hub's replay state for that id belongs to (kept when a node is deleted). A
        # registry written before this table existed: every id that was ever trusted was trusted with its own key.
        self._replay: dict[str, str] = {doc["id"]: doc["kid"] for doc in self._replay_table.all()}
        for doc in self._cache.values():
            if doc["state"] != "pending":
                self._replay.setdefault(doc["id"], doc["kid"])
        # Pending ids, oldest request first: dropping the oldest when full is O(1), an enroll storm stays cheap.
        pending = sorted((d for d in self._cache.values() if d["state"] == "pending"),
                         key=lambda d: (d["requested_at"], d["id"]))
        self._pending: dict[str, None] = {d["id"]: None for d in pending}
        self._dirty = False
        self.log = ThrottledLog(log)

    def get(self, node_id: str) -> dict[str, Any] | None:
        return self._cache.get(node_id)

    def all(self) -> list[dict[str, Any]]:
        return sorted(self._cache.values(), key=lambda d: d["id"])

    def accepted_keys(self) -> list[tuple[str, bytes]]:
        return [(d["id"], bytes.fromhex(d["key"])) for d in self._cache.values() if d["state"] == "accepted"]

    def pending_count(self) -> int:
        return len(self._pending)

    def pending(self) -> list[dict[str, Any]]:
        """Pending requests, oldest first, each with the kid it asks with now."""
        return [self._cache[node_id] for node_id in self._pending]

    def token_uses(self, token: str | None) -> int:
        return int(self._uses.get(token or "", {}).get("uses", 0))

    def _put(self, doc: dict[str, Any]) -> dict[str, Any]:
        self._cache[doc["id"]] = dict(doc)
        if doc["state"] == "pending":
            self._pending.setdefault(doc["id"], None)
        else:
            self._pending.pop(doc["id"], None)
        self._dirty = True
        return doc

    def flush(self) -> None:
        """Write every change since the last flush in one durable write (nodes and token uses together)."""
        if self._dirty:
            self._nodes.truncate()
            self._nodes.insert_multiple(self.all())
            self._tokens.truncate()
            self._tokens.insert_multiple(sorted(self._uses.values(), key=lambda d: d["id"]))
            self._replay_table.truncate()
            self._replay_table.insert_multiple([{"id": i, "kid": k} for i, k in sorted(self._replay.items())])
            self._dirty = False

    # -- enroll requests (from the wire) -------------------------------------------------------------------------

    def request(self, node_id: str, key: bytes, profile: str, labels: dict[str, str], at: int,
                policy: EnrollPolicy, proof: bool | None = None) -> Enrollment:
        """An enroll request arrived. `proof`: None if it carried no token proof (or the hub has no token), else
        whether the proof verified for this fleet, id and key."""
        kid = fingerprint(key)
        if node_id == HUB_ID:
            return Enrollment("reserved", kid)
        doc = self._cache.get(node_id)
        if doc is not None and doc["state"] != "pending":
            if doc["key"] != key.hex():
                if doc["state"] == "accepted":
                    return Enrollment("taken", kid, enrolled_kid=doc["kid"])
                return Enrollment("rejected", kid)  # an operator refused this id; it stays refused
            # the same key asking again (a restart, a lost ack): answer, and use no token
            return Enrollment("accepted" if doc["state"] == "accepted" else "rejected", kid)

        admitted_by = "auto" if policy.auto_accept else ""
        token, uses = "", self.token_uses(policy.token)
        if proof is False:
            token = "bad"
        elif proof is True and policy.token is not None and not admitted_by:
            if uses < policy.token_uses:
                token, admitted_by, uses = "used", "token", uses + 1
                record = self._uses.get(policy.token) or {"id": policy.token, "uses": 0, "nodes": []}
                self._uses[policy.token] = {**record, "uses": uses, "nodes": [*record["nodes"], node_id]}
            else:
                token = "spent"
        state = "accepted" if admitted_by else "pending"

        replaced = ""
        dropped: tuple[str, ...] = ()
        if doc is None:
            if state == "pending":
                dropped = self._make_room(policy.max_pending)
            doc = {"id": node_id, "key": key.hex(), "kid": kid, "state": state, "profile": profile, "labels": labels,
                   "requested_at": at, "changed_at": at}
        elif doc["key"] != key.hex():
            # Another key for a pending id: the request starts over (and goes to the back of the queue), so an
            # operator's accept of the kid reviewed earlier no longer matches.
            replaced = doc["kid"]
            self._pending.pop(node_id, None)
            doc = {**doc, "key": key.hex(), "kid": kid, "state": state, "profile": profile, "labels": labels,
                   "requested_at": at, "changed_at": at}
        elif state != doc["state"]:
            doc = {**doc, "state": state, "changed_at": at}
        else:
            return Enrollment(state, kid, token=token, token_uses=uses)  # unchanged: nothing to write
        self._put(doc)
        return Enrollment(state, kid, new=True, replaced_kid=replaced, admitted_by=admitted_by, token=token,
                          token_uses=uses, dropped=dropped)

    def _make_room(self, limit: int) -> tuple[str, ...]:
        dropped = []
        while self._pending and len(self._pending) >= max(1, limit):
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            del self._cache[oldest]
            dropped.append(oldest)
            self._dirty = True
        return tuple(dropped)

    # -- operator actions (written at once) -----------------------------------------------------------------------

    def add(self, node_id: str, key: bytes, at: int) -> dict[str, Any]:
        """Enroll a key an operator names: before the node first connects, or to re-key a node that was revoked,
        rejected or deleted (its device has a new key). An id enrolled with another key is refused: revoke it first,
        so a mistyped id never takes over a working node."""
        check_id(node_id, "node id")
        if node_id == HUB_ID:
            raise BadEntry(f"the node id {HUB_ID!r} is reserved for the hub")
        if len(key) != 32:
            raise BadEntry("a public key has 32 bytes")
        doc = self._cache.get(node_id)
        if doc is not None and doc["state"] == "accepted":
            if doc["key"] == key.hex():
                return doc  # already enrolled with this key: nothing to do
            raise KeyTaken(f"node {node_id!r} is enrolled with kid {doc['kid']}, not {fingerprint(key)}; to re-key it, "
                           f"revoke it first (nodes revoke {node_id}), then add the new key")
        doc = self._put({"id": node_id, "key": key.hex(), "kid": fingerprint(key), "state": "accepted", "profile": "",
                         "labels": {}, "requested_at": at, "changed_at": at})
        self.flush()
        return doc

    def fresh_key(self, node_id: str) -> bool:
        """True if the hub's replay state for this id was built with another key than the accepted one, and must
        start afresh before that key is trusted: the device behind a new key may count its boots from 1 again, and
        no message signed with the new key can have been captured before it was enrolled."""
        doc = self._cache.get(node_id)
        return doc is not None and doc["state"] == "accepted" and self._replay.get(node_id) != doc["kid"]

    def trusted(self, node_id: str) -> None:
        """The replay state of this id now belongs to its accepted key (written with the next flush: per batch on
        the enroll path, at once by operator actions)."""
        kid = self._existing(node_id)["kid"]
        if self._replay.get(node_id) != kid:
            self._replay[node_id] = kid
            self._dirty = True

    def stale_replay(self) -> list[str]:
        """Accepted ids whose replay state is not yet reset for their key (a stop between an add and the reset)."""
        return [node_id for node_id in self._cache if self.fresh_key(node_id)]

    def accept_pending(self, at: int) -> list[dict[str, Any]]:
        """Accept every pending request with the key it asks with now; rejected and revoked ids are not pending."""
        accepted = [self._put({**doc, "state": "accepted", "changed_at": at}) for doc in self.pending()]
        self.flush()
        return accepted

    def delete(self, node_id: str) -> dict[str, Any]:
        """Forget a node's enrollment (any state). The replay state's key is kept: see `trusted`."""
        doc = self._existing(node_id)
        del self._cache[node_id]
        self._pending.pop(node_id, None)
        self._dirty = True
        self.flush()
        return doc

    def accept(self, node_id: str, key_or_kid: str, at: int) -> dict[str, Any]:
        """Accept the key an operator reviewed, named by its kid (or the full public key, in hex)."""
        doc = self._existing(node_id)
        given = key_or_kid.strip().lower()
        if given not in (doc["kid"], doc["key"]):
            raise KeyMismatch(f"node {node_id!r} now asks to enroll with kid {doc['kid']}, not {given}: its key "
                              f"changed since it was reviewed (or the kid is mistyped); check it again with "
                              f"`fleetflow nodes show {node_id}`")
        if doc["state"] == "revoked":
            raise RegistryError(f"node {node_id!r} was revoked; add it again with a new key")
        if doc["state"] != "accepted":
            doc = self._put({**doc, "state": "accepted", "changed_at": at})
            self.flush()
        return doc

    def set_state(self, node_id: str, state: str, at: int) -> dict[str, Any]:
        """Reject or revoke (accepting goes through `accept`, which names the key)."""
        doc = self._existing(node_id)
        if state not in STATES or state == "accepted":
            raise RegistryError(f"cannot set enrollment state {state!r} this way")
        doc = self._put({**doc, "state": state, "changed_at": at})
        self.flush()
        return doc

    def _existing(self, node_id: str) -> dict[str, Any]:
        doc = self._cache.get(node_id)
        if doc is None:
            raise NoSuchNode(f"no node {node_id!r} has asked to enroll or been added")
        return doc

    def close(self) -> None:
        self.flush()
        self._db.close()


# -- label selectors ---------------------------------------------------------------------------------------------

def parse_selector(pairs: list[str]) -> dict[str, str]:
    """`-l key=value` selectors (repeatable; a node must match all). Raises ValueError naming the bad one."""
    selector: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"label selector {pair[:80]!r}: expected KEY=VALUE")
        key = key.strip()
        if key in selector and selector[key] != value:
            raise ValueError(f"label selector: {key} cannot be both {selector[key]!r} and {value!r}")
        selector[key] = value
    return selector


def matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
