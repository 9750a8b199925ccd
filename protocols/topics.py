"""The topic tree: `fleetflow/v1/{fleet}/node/{node_id}/{kind}` and `fleetflow/v1/{fleet}/hub/state`.

Topics are frozen, validated values: ids are checked before they ever reach a topic string, so a node id can never
inject a `/`, `+` or `#` into the tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, TypeGuard

from .errors import LocalProtocolError, WrongTopic

PREFIX: Final = "fleetflow"
VERSION: Final = "v1"
NODE_KINDS: Final = frozenset({"enroll", "birth", "death", "hb", "tel", "evt", "cmd"})
HUB_STATE: Final = "state"

_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


_seen_ids: dict[str, bool] = {}  # ids repeat in every message; a bounded cache saves the regex on the hot path


def is_valid_id(value: object) -> TypeGuard[str]:
    """True when `value` is a fleet, node or run id: `[A-Za-z0-9_.-]{1,64}`."""
    if type(value) is not str:
        return False
    if value in _seen_ids:
        return True
    if _ID.fullmatch(value) is None:
        return False
    if len(_seen_ids) >= 65536:
        _seen_ids.clear()
    _seen_ids[value] = True
    return True


def check_id(value: object, what: str = "id") -> str:
    """Return `value` if it is a valid id, else raise `LocalProtocolError` naming it."""
    if not is_valid_id(value):
        raise LocalProtocolError(f"{what} {value!r} is not a valid id: it must match [A-Za-z0-9_.-]{{1,64}}")
    return value


@dataclass(frozen=True, slots=True)
class Topic:
    """One concrete topic. `node_id` is None for the hub's state topic (kind `state`)."""

    fleet: str
    kind: str
    node_id: str | None = None

    def __post_init__(self) -> None:
        check_id(self.fleet, "fleet")
        if self.node_id is None:
            if self.kind != HUB_STATE:
                raise LocalProtocolError(f"topic kind {self.kind!r} needs a node id")
        else:
            check_id(self.node_id, "node id")
            if self.kind not in NODE_KINDS:
                raise LocalProtocolError(f"unknown node topic kind {self.kind!r}")

    @classmethod
    def node(cls, fleet: str, node_id: str, kind: str) -> Topic:
        return cls(fleet, kind, node_id)

    @classmethod
    def hub_state(cls, fleet: str) -> Topic:
        return cls(fleet, HUB_STATE)

    @property
    def value(self) -> str:
        if self.node_id is None:
            return f"{PREFIX}/{VERSION}/{self.fleet}/hub/{HUB_STATE}"
        return f"{PREFIX}/{VERSION}/{self.fleet}/node/{self.node_id}/{self.kind}"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str) -> Topic:
        """Parse a received topic string; anything outside the tree raises `WrongTopic`."""
        parts = value.split("/")
        if len(parts) == 6 and parts[:2] == [PREFIX, VERSION] and parts[3] == "node":
            fleet, node_id, kind = parts[2], parts[4], parts[5]
            if is_valid_id(fleet) and is_valid_id(node_id) and kind in NODE_KINDS:
                return cls(fleet, kind, node_id)
        elif len(parts) == 5 and parts[:2] == [PREFIX, VERSION] and parts[3:] == ["hub", HUB_STATE]:
            if is_valid_id(parts[2]):
                return cls(parts[2], HUB_STATE)
        raise WrongTopic(f"topic {value[:200]!r} is not in the fleetflow/v1 tree")


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether an MQTT topic filter takes a topic name: `+` is one level, `#` the rest (`a/#` also takes `a`). A
    broker adds that a wildcard first level never takes a `$` topic (agent/runtime/memory.py `topic_matches`)."""
    levels = topic.split("/")
    pattern = topic_filter.split("/")
    for i, want in enumerate(pattern):
        if want == "#":
            return True
        if i >= len(levels) or (want != "+" and want != levels[i]):
            return False
    return len(levels) == len(pattern)


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """A subscription filter with MQTT wildcards (`+` one level, `#` the rest), with `matches()` like aiomqtt's."""

    value: str

    def __post_init__(self) -> None:
        levels = self.value.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise LocalProtocolError(f"'#' must be a whole last level in filter {self.value!r}")
            if "+" in level and level != "+":
                raise LocalProtocolError(f"'+' must be a whole level in filter {self.value!r}")

    @classmethod
    def node_kind(cls, fleet: str, kind: str) -> TopicFilter:
        """Every node's messages of one kind in a fleet (what the hub subscribes to)."""
        check_id(fleet, "fleet")
        if kind not in NODE_KINDS:
            raise LocalProtocolError(f"unknown node topic kind {kind!r}")
        return cls(f"{PREFIX}/{VERSION}/{fleet}/node/+/{kind}")

    def matches(self, topic: str | Topic) -> bool:
        return filter_matches(self.value, str(topic))

    def __str__(self) -> str:
        return self.value
