"""Enrolled node keys: pending, accepted, rejected, revoked. A small document a person may read (TinyDB, fsync'd).

TinyDB rewrites its whole file on every write, so an enrollment storm (thousands of devices at once) would cost
O(N) per device. Changes are therefore applied in memory and written by `flush()`: the hub flushes once per batch
of messages, before it sends any answer that depends on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinydb import TinyDB

from agent.identity import DurableJSONStorage
from protocols import check_id

STATES = ("pending", "accepted", "rejected", "revoked")


class RegistryError(ValueError):
    pass


class Registry:
    def __init__(self, path: Path) -> None:
        self._db = TinyDB(str(path), storage=DurableJSONStorage)
        self._nodes = self._db.table("nodes")
        self._cache = {doc["id"]: dict(doc) for doc in self._nodes.all()}
        self._dirty = False

    def get(self, node_id: str) -> dict[str, Any] | None:
        return self._cache.get(node_id)

    def all(self) -> list[dict[str, Any]]:
        return sorted(self._cache.values(), key=lambda d: d["id"])

    def accepted_keys(self) -> list[tuple[str, bytes]]:
        return [(d["id"], bytes.fromhex(d["key"])) for d in self._cache.values() if d["state"] == "accepted"]

    def _put(self, doc: dict[str, Any]) -> dict[str, Any]:
        self._cache[doc["id"]] = dict(doc)
        self._dirty = True
        return doc

    def flush(self) -> None:
        """Write every change since the last flush in one durable write."""
        if self._dirty:
            self._nodes.truncate()
            self._nodes.insert_multiple(self.all())
            self._dirty = False

    def request(self, node_id: str, key: bytes, profile: str, labels: dict[str, str], at: int,
                auto_accept: bool, token_ok: bool) -> str:
        """An enroll request arrived; returns the node's enrollment state after it."""
        doc = self._cache.get(node_id)
        if doc is None:
            state = "accepted" if auto_accept or token_ok else "pending"
            self._put({"id": node_id, "key": key.hex(), "state": state, "profile": profile, "labels": labels,
                       "requested_at": at, "changed_at": at})
            return state
        if doc["key"] != key.hex():
            if doc["state"] == "pending":  # a pending request may be replaced by a newer key
                return self._put({**doc, "key": key.hex(), "requested_at": at})["state"]
            return "rejected"  # an accepted id asking with another key: refuse, never silently replace
        if doc["state"] == "pending" and (auto_accept or token_ok):
            return self._put({**doc, "state": "accepted", "changed_at": at})["state"]
        return doc["state"]  # type: ignore[no-any-return]

    def add(self, node_id: str, key: bytes, at: int) -> dict[str, Any]:
        """Pre-register (an operator adds a node's key before it ever connects)."""
        check_id(node_id, "node id")
        if len(key) != 32:
            raise RegistryError("a public key has 32 bytes")
        doc = self._put({"id": node_id, "key": key.hex(), "state": "accepted", "profile": "", "labels": {},
                         "requested_at": at, "changed_at": at})
        self.flush()
        return doc

    def set_state(self, node_id: str, state: str, at: int) -> dict[str, Any]:
        doc = self._cache.get(node_id)
        if doc is None:
            raise RegistryError(f"no node {node_id!r} has asked to enroll or been added")
        if state not in STATES:
            raise RegistryError(f"unknown enrollment state {state!r}")
        if doc["state"] == "revoked" and state == "accepted":
            raise RegistryError(f"node {node_id!r} was revoked; add it again with a new key")
        doc = self._put({**doc, "state": state, "changed_at": at})
        self.flush()
        return doc

    def close(self) -> None:
        self.flush()
        self._db.close()
