"""What the device daemon and the hub both run on: the transport boundary, key files, durable storage, the clock,
backoff, throttled logs, settings layering, data-directory locking and firmware profiles. See README.md.

The names below load on first use: every `fleetflow` command imports this package (agent/cli.py reads
`agent.runtime.console`), and must not pay for aiomqtt, paho or TinyDB unless it uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backoff import Backoff
    from .clock import Clock, now_ms
    from .keys import KeyFileError, load_key, parse_public_key, write_new_key
    from .logs import ThrottledLog
    from .settings import ConfigError, SettingsSpec, layer_settings
    from .startup import DataLock, StartupError, broker_unreachable
    from .storage import DurableJSONStorage
    from .transport import (BrokerSettings, MqttTransport, Session, Transport, TransportError, Will,
                            session_client_id)

# Each name, and the module of this package that holds it.
_HOME = {
    "Backoff": "backoff", "Clock": "clock", "now_ms": "clock", "KeyFileError": "keys", "load_key": "keys",
    "parse_public_key": "keys", "write_new_key": "keys", "ThrottledLog": "logs", "ConfigError": "settings",
    "SettingsSpec": "settings", "layer_settings": "settings", "DataLock": "startup", "StartupError": "startup",
    "broker_unreachable": "startup", "DurableJSONStorage": "storage", "BrokerSettings": "transport",
    "MqttTransport": "transport", "Session": "transport", "Transport": "transport", "TransportError": "transport",
    "Will": "transport", "session_client_id": "transport",
}

__all__ = [
    "Backoff", "Clock", "now_ms", "KeyFileError", "load_key", "parse_public_key", "write_new_key", "ThrottledLog",
    "ConfigError", "SettingsSpec", "layer_settings", "DataLock", "StartupError", "broker_unreachable",
    "DurableJSONStorage", "BrokerSettings", "MqttTransport", "Session", "Transport", "TransportError", "Will",
    "session_client_id",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
