"""`hub run --embedded-broker` and the demo: an amqtt broker (the `broker` extra), for labs and demos only.

Worked around here: amqtt 0.12 iterates its subscription table across awaits (`for topic in self._subscriptions:
await ...` when a client connects, and while broadcasting), so a client subscribing meanwhile raises `dictionary
changed size during iteration`. A connect that dies that way leaves a zombie session: CONNACK sent, no SUBACK ever,
nothing routed, no Will; the devices (or the hub) behind it wait for messages that never come.
`SnapshotSubscriptions` makes those loops iterate over a copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any


class _SnapshotList(list[Any]):
    """A topic's subscribers, iterated over a copy (amqtt removes from the list while others iterate it)."""

    def __iter__(self) -> Iterator[Any]:
        return iter(list.copy(self))


class SnapshotSubscriptions(dict[str, Any]):
    """amqtt's topic -> subscribers table, iterated over a copy of its keys and items, so awaiting inside a loop over
    it is safe while other clients subscribe and leave."""

    def __init__(self, items: dict[str, Any] | None = None) -> None:
        super().__init__()
        for key, value in (items or {}).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value if isinstance(value, _SnapshotList) else _SnapshotList(value))

    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.keys(self)))

    def items(self) -> Any:  # a list, not a view: a loop over it survives changes to the table
        return list(dict.items(self))



async def start_embedded_broker(url: str) -> Any:
    """An amqtt broker in this process, listening where the broker URL points."""
    from urllib.parse import urlsplit

    from amqtt.broker import Broker

    # amqtt, and the state-machine library under it, log every connection and callback at INFO: that chatter is
    # shown only when the hub logs at debug.
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
    parts = urlsplit(url)
    config = {"listeners": {"default": {"type": "tcp", "bind": f"{parts.hostname}:{parts.port or 1883}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
    broker = Broker(config)
    broker._subscriptions = SnapshotSubscriptions(broker._subscriptions)  # before any client can connect
    await broker.start()
    return broker
