"""What `hub run --sparkplug ...` configures, and the checks of its values. Nothing here imports protobuf: the hub's
settings are read (and `fleetflow hub` commands run) without it; only a hub started with --sparkplug loads it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..events import Event
    from ..service import Hub

DEFAULT_GROUP = "fleetflow"
# Report-by-exception thresholds: a telemetry metric is sent again only once it moved by more than this since the
# value last sent (in the metric's unit: percent, degrees Celsius). Keys are the agent's telemetry names.
DEFAULT_DEADBAND: Mapping[str, float] = {"cpu": 2.0, "mem": 1.0, "disk": 1.0, "temp": 0.5}
MAX_ID_CHARS = 128
# The specification reserves these in group, edge node and device ids (they are MQTT topic levels and wildcards).
RESERVED = frozenset("+/#")
NAMESPACE = "spBv1.0"
# What an edge node publishes about itself and about its devices; hosts write NCMD and DCMD to it.
NODE_KINDS = ("NBIRTH", "NDATA", "NDEATH")
DEVICE_KINDS = ("DBIRTH", "DDATA", "DDEATH")


@dataclass(frozen=True)
class SparkplugSettings:
    group: str = DEFAULT_GROUP
    node_id: str | None = None          # the Edge Node id; None: the fleet id
    host: str | None = None             # a primary host application to wait for (its STATE), or none
    deadband: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_DEADBAND))
    commands: bool = False              # act on DCMD writes (Device Control/Drain); refused while False


def sparkplug_topic(group: str, kind: str, edge_node: str, device: str | None = None) -> str:
    """`spBv1.0/GROUP/KIND/EDGE_NODE[/DEVICE]`: the edge node's topics (and topic filters, with `+` as the device),
    for the bridge and for the broker's ACLs alike."""
    base = f"{NAMESPACE}/{group}/{kind}/{edge_node}"
    return base if device is None else f"{base}/{device}"


def state_topic(host: str) -> str:
    """Where a host application publishes its STATE (retained, and its Will)."""
    return f"{NAMESPACE}/STATE/{host}"


def check_sparkplug_id(value: Any) -> str:
    """A group, edge node, device or host id as the specification allows it (any UTF-8 but + / #), without control
    characters either (a NUL cannot be in an MQTT topic) and bounded, as it travels in every topic."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{len(value)} characters, more than {MAX_ID_CHARS}")
    bad = sorted({c for c in value if c in RESERVED or ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        raise ValueError(f"{value!r} contains {', '.join(repr(c) for c in bad)} (Sparkplug ids may not contain + / # "
                         f"or control characters)")
    return value


def parse_deadband(value: Any) -> dict[str, float]:
    """`cpu=2,temp=0.5` (a flag or FLEETFLOW_SPARKPLUG_DEADBAND) or a TOML table {cpu = 2, temp = 0.5}; metrics not
    named keep their default. 0 sends every change."""
    if isinstance(value, str):
        pairs: list[tuple[str, Any]] = []
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            key, sep, number = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: expected METRIC=NUMBER, e.g. cpu=2,temp=0.5")
            pairs.append((key.strip(), number.strip()))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise ValueError("expected METRIC=NUMBER,... or a table of numbers")
    out = dict(DEFAULT_DEADBAND)
    for key, number in pairs:
        if key not in DEFAULT_DEADBAND:
            raise ValueError(f"no telemetry metric {key!r} has a deadband (known: {', '.join(DEFAULT_DEADBAND)})")
        try:
            band = float(number) if not isinstance(number, bool) else float("nan")
        except (TypeError, ValueError):
            band = float("nan")
        if not band >= 0 or band == float("inf"):
            raise ValueError(f"{key}: expected a number of at least 0, got {number!r}")
        out[key] = band
    return out


class NoBridge:
    """The hub's Sparkplug hooks with --sparkplug off: nothing happens (`SparkplugBridge` overrides each)."""

    def applied(self, event: Event) -> None:
        """An event the hub just applied to its core."""

    def node_message(self, node: str, body: Any) -> None:
        """A verified message from a node, before the events it makes are applied."""

    async def run(self) -> None:
        """Serve until cancelled."""


def bridge_for(hub: Hub, settings: SparkplugSettings | None) -> NoBridge:
    """The hub's Sparkplug bridge (a `SparkplugBridge`), or a `NoBridge` with --sparkplug off. Only a bridge that is
    on imports protobuf."""
    if settings is None:
        return NoBridge()
    try:
        from .bridge import SparkplugBridge
    except Exception as exc:  # protobuf missing, or older than the generated module accepts (its VersionError)
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "google"
        if not missing and not type(exc).__module__.startswith("google.protobuf"):
            raise
        from ..errors import OperatorError

        raise OperatorError(f"--sparkplug needs the protobuf package of the hub extra (pip install "
                            f"'fleetflow[hub]'): {exc}") from None
    return SparkplugBridge(hub, settings)
