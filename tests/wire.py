"""Plain MQTT clients for tests that act on the wire as a third party would: watch topics, publish raw payloads."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from tests.brokers import HOST, Broker


def _client(client_id: str = "") -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)


def _connect(client: mqtt.Client, broker: Broker, timeout: float = 15.0) -> None:
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(HOST, broker.port, keepalive=60)
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise AssertionError(f"could not connect to {broker.url} within {timeout} s")


class Observer:
    """Records every message on the given topic filters, from a separate connection."""

    def __init__(self, broker: Broker, *filters: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._client = _client()
        self._client.on_message = self._on_message
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: subscribed.set()
        _connect(self._client, broker)
        self._client.subscribe([(f, 1) for f in filters])
        if not subscribed.wait(15):
            raise AssertionError(f"no SUBACK for {filters}")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def on(self, suffix: str) -> list[bytes]:
        with self._lock:
            return [payload for topic, payload in self.messages if topic.endswith(suffix)]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class Publisher:
    """Publishes raw payloads; `client_id` may be chosen (to impersonate a connection)."""

    def __init__(self, broker: Broker, client_id: str = "") -> None:
        self._client = _client(client_id)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        _connect(self._client, broker)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> mqtt.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=qos)

    def publish_all(self, messages: list[tuple[str, bytes]], qos: int, timeout: float = 120.0) -> None:
        """Publish every message and wait until the broker has them all (QoS 1: every PUBACK)."""
        infos = [self._client.publish(topic, payload, qos=qos) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise AssertionError(f"publishing {len(messages)} messages took over {timeout} s")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()
