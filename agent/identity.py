"""The agent's identity in its data directory: its key (0600), and a small TinyDB document with the node id, fleet,
boot counter, enrollment state and the hub keys it trusts. Writes are fsync'd: a boot number
must never be reused after a power cut.

Hub keys: the pinned one (configured with --hub-key, or first seen with --trust-first-hub-key), the next one the hub
announced during a key rotation (docs/protocol.md 7.2), and the keys the hub rotated away from. Those retired keys
are not trusted; they only let a node whose configuration still names one recognise it as an ancestor of the key it
follows now, so it keeps working after a restart without being reconfigured.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
from tinydb import TinyDB

from protocols import FleetflowError, check_id, kid_for

from .runtime.keys import load_key, read_private_text, write_new_key
from .runtime.storage import DurableJSONStorage, write_private

KEY_FILE = "node.key"
DOC_FILE = "identity.json"
BROKER_PASSWORD_FILE = "broker.password"


class IdentityError(FleetflowError):
    """The data directory belongs to another node or fleet, or cannot be used."""


@dataclass
class Identity:
    data_dir: Path
    node_id: str
    fleet: str
    key: nacl.signing.SigningKey
    _db: TinyDB

    @classmethod
    def open(cls, data_dir: Path, node_id: str | None = None, fleet: str | None = None) -> Identity:
        """Open (or, with node_id and fleet, create) the identity in `data_dir`."""
        data_dir = Path(data_dir)
        doc_path = data_dir / DOC_FILE
        if not doc_path.exists() and (node_id is None or fleet is None):
            raise IdentityError(f"{data_dir} holds no agent identity (start the agent once with --node-id and --fleet)")
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o700)
        db = TinyDB(str(doc_path), storage=DurableJSONStorage)
        doc: Any = db.table("identity").get(doc_id=1) or {}
        if doc:
            for name, given in (("node_id", node_id), ("fleet", fleet)):
                if given is not None and doc[name] != given:
                    raise IdentityError(f"{data_dir} belongs to {name} {doc[name]!r}, not {given!r}; "
                                        f"use another --data directory for another node")
        else:
            check_id(node_id, "node id")
            check_id(fleet, "fleet")
            db.table("identity").insert({"node_id": node_id, "fleet": fleet, "boot": 0, "enrolled": False})
            doc = db.table("identity").get(doc_id=1)
        key_path = data_dir / KEY_FILE
        key = load_key(key_path) if key_path.exists() else write_new_key(key_path)
        return cls(data_dir, doc["node_id"], doc["fleet"], key, db)

    @property
    def public_key(self) -> bytes:
        return bytes(self.key.verify_key)

    @property
    def kid(self) -> bytes:
        return kid_for(self.public_key)

    def _doc(self) -> dict[str, Any]:
        return self._db.table("identity").get(doc_id=1) or {}

    def _update(self, **fields: Any) -> None:
        self._db.table("identity").update(fields, doc_ids=[1])

    @property
    def boot(self) -> int:
        return int(self._doc()["boot"])

    def next_boot(self) -> int:
        """+1 on every start and every new session, written durably before it is used."""
        boot = self.boot + 1
        self._update(boot=boot)
        return boot

    @property
    def enrolled(self) -> bool:
        return bool(self._doc().get("enrolled"))

    def set_enrolled(self, value: bool) -> None:
        self._update(enrolled=value)

    @property
    def hub_key(self) -> bytes | None:
        value = self._doc().get("hub_key")
        return bytes.fromhex(value) if value else None

    def pin_hub_key(self, key: bytes) -> None:
        """Trust this hub key (configured, or first seen); a rotation followed before is forgotten."""
        self._update(hub_key=key.hex(), hub_next_key=None, hub_retired_keys=[])

    @property
    def hub_next_key(self) -> bytes | None:
        value = self._doc().get("hub_next_key")
        return bytes.fromhex(value) if value else None

    @property
    def hub_retired_keys(self) -> list[bytes]:
        return [bytes.fromhex(k) for k in self._doc().get("hub_retired_keys", [])]

    def announce_hub_key(self, key: bytes) -> None:
        """The hub announced its next key, in a hub state signed by the pinned key: trust it too."""
        self._update(hub_next_key=key.hex())

    def switch_hub_key(self, key: bytes) -> None:
        """The hub signs with its announced next key now: that key is pinned, the previous one retired."""
        retired = [k.hex() for k in self.hub_retired_keys]
        pinned = self.hub_key
        if pinned is not None and pinned != key and pinned.hex() not in retired:
            retired.append(pinned.hex())
        self._update(hub_key=key.hex(), hub_next_key=None, hub_retired_keys=retired[-16:])  # bounded

    def broker_password(self) -> str:
        """The password this node logs in to the broker with, as its node id, when it manages its own login (an
        enrollment login is configured): made once, random, mode 0600 beside its key. The hub learns it from an
        enroll request sent over the enrollment login; if the file is lost, a new one is made and sent the same
        way, and the hub updates the login of the node's enrolled key."""
        path = self.data_dir / BROKER_PASSWORD_FILE
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32).encode() + b"\n")
        return read_private_text(path, "broker password file")

    def intervals(self) -> tuple[float | None, float | None]:
        doc = self._doc()
        return doc.get("hb"), doc.get("tel")

    def save_intervals(self, hb: float, tel: float) -> None:
        self._update(hb=hb, tel=tel)

    def describe(self) -> dict[str, Any]:
        info = {"node_id": self.node_id, "fleet": self.fleet, "kid": self.kid.hex(),
                "public_key": self.public_key.hex(), "boot": self.boot, "enrolled": self.enrolled,
                "hub_key": self.hub_key.hex() if self.hub_key else None}
        if self.hub_next_key is not None:
            info["hub_next_key"] = self.hub_next_key.hex()  # a hub key rotation under way
        return info

    def close(self) -> None:
        self._db.close()
