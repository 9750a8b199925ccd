"""The transport boundary: plain (topic, payload) in and out, like httpx's transports.

`MqttTransport` (aiomqtt) is the real one. Agent code only sees `Session`, so a simulator or a test can run the real
agent over another transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import select
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiomqtt

from protocols import FleetflowError


OPERATION_TIMEOUT_S = 10.0


def session_client_id(name: str) -> str:
    """A new, unguessable MQTT client id for every session. A broker closes the older of two connections with one
    client id (and publishes its Last Will), so a predictable id lets anyone knock a node or the hub offline. The
    name stays readable in broker logs."""
    return f"{name[:40]}-{secrets.token_hex(8)}"


class TransportError(FleetflowError):
    """The connection failed or was lost; the caller reconnects with backoff."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class Session(Protocol):
    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None: ...

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    def messages(self) -> AsyncIterator[tuple[str, bytes]]: ...

    async def closed(self) -> None:
        """Returns when the connection ends; raises `TransportError` if it was lost."""
        ...


class Transport(Protocol):
    def connect(self, client_id: str, will: Will | None) -> contextlib.AbstractAsyncContextManager[Session]: ...


@dataclass(frozen=True)
class BrokerSettings:
    url: str
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30

    def parsed(self) -> tuple[str, int, bool]:
        """(host, port, tls) from mqtt://HOST:PORT or mqtts://HOST:PORT."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {self.url!r}: scheme must be mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {self.url!r} has no host")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ValueError(f"broker URL {self.url!r} has an invalid port") from None
        return parts.hostname, port, tls


class _MqttSession:
    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise TransportError(str(exc)) from exc

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        try:
            await self._client.subscribe(topic_filter, qos=qos)
        except aiomqtt.MqttError as exc:
            raise TransportError(str(exc)) from exc

    async def messages(self) -> AsyncIterator[tuple[str, bytes]]:
        try:
            async for message in self._client.messages:
                payload = message.payload
                yield str(message.topic), payload if isinstance(payload, bytes) else bytes(str(payload), "utf-8")
        except aiomqtt.MqttError as exc:
            raise TransportError(str(exc)) from exc

    async def closed(self) -> None:
        # For an owner that drains its own incoming queue (the hub's intake). aiomqtt has no public awaitable for
        # the end of a connection; its message iterator waits on this same future.
        disconnected: asyncio.Future[None] = self._client._disconnected  # noqa: SLF001
        try:
            await asyncio.shield(disconnected)
        except aiomqtt.MqttError as exc:
            raise TransportError(str(exc)) from exc


def _read_in_bursts(client: Any, burst: int, on_backlog: Callable[[bool], None] | None) -> None:
    """Make paho read up to `burst` packets each time the socket is readable, instead of one per event-loop turn.

    With one packet a turn, a receiver that also works on the loop leaves its backlog in the kernel and the broker,
    where it can neither see it nor put a heartbeat ahead of a flood. Read in bursts, the backlog lands in the
    incoming queue (the hub's intake), which screens, prioritises and measures it. A full burst with data still
    waiting calls `on_backlog(True)`, any other read `on_backlog(False)`: the receiver judges what lasts."""
    read_one = client.loop_read

    def waiting() -> bool:
        sock = client.socket()
        return sock is not None and bool(getattr(sock, "pending", lambda: 0)() or select.select([sock], [], [], 0)[0])

    def loop_read(max_packets: int = 1) -> Any:
        rc = read_one()
        for _ in range(burst - 1):
            if rc != 0 or not waiting():
                break
            rc = read_one()
        if on_backlog is not None and rc == 0:
            on_backlog(waiting())  # True: a full burst and still more to read
        return rc

    client.loop_read = loop_read


def _reset(client: aiomqtt.Client) -> None:
    """Reset the client's TCP connection, if it has one: paho reads the end on the socket's next readiness and closes
    it (aiomqtt unregisters it then). After a connect cancelled while it waited for the CONNACK, the socket is closed
    at once; left alone it stays open until the client object is collected, if ever (the enrollment request's did not
    close while the agent ran: tests/integration/test_agent_stop.py)."""
    paho = getattr(client, "_client", None)  # aiomqtt's paho client
    sock = paho.socket() if paho is not None else None
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)


class MqttTransport:
    def __init__(self, settings: BrokerSettings, incoming: Callable[..., Any] | None = None, read_burst: int = 1,
                 on_backlog: Callable[[bool], None] | None = None) -> None:
        """`incoming`, if given, makes the queue each connection puts received messages in (called with
        `maxsize=`); the hub passes its intake, which screens and prioritises as messages arrive. `read_burst`
        packets are read per readiness of the socket (see `_read_in_bursts`)."""
        self.settings = settings
        self.incoming = incoming
        self.read_burst, self.on_backlog = read_burst, on_backlog
        self.host, self.port, self.tls = settings.parsed()
        self._client: aiomqtt.Client | None = None

    def abort(self) -> None:
        """Drop the connection like a power cut: a TCP reset, no DISCONNECT, so the broker publishes the Will.
        Used by the simulator's fault injection."""
        if self._client is not None:
            _reset(self._client)

    @contextlib.asynccontextmanager
    async def connect(self, client_id: str, will: Will | None) -> AsyncIterator[Session]:
        s = self.settings
        tls_context = None
        if self.tls:
            tls_context = ssl.create_default_context(cafile=s.ca_file)
            if s.cert_file:
                tls_context.load_cert_chain(s.cert_file, s.key_file)
        client = aiomqtt.Client(
            self.host, self.port, identifier=client_id, username=s.username, password=s.password,
            will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain) if will else None,
            keepalive=s.keepalive, tls_context=tls_context, clean_session=True, max_queued_incoming_messages=10_000,
            queue_type=self.incoming,  # type: ignore[arg-type]  # a factory with Queue's calls is enough
            # A broker that stops answering (a SUBACK or PUBACK that never comes) ends the session, and the caller
            # reconnects with a new boot, instead of waiting forever.
            timeout=OPERATION_TIMEOUT_S,
            max_inflight_messages=100,
            # Small messages each way: Nagle plus delayed ACKs would add tens of ms per round trip.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        if self.read_burst > 1:
            _read_in_bursts(client._client, self.read_burst, self.on_backlog)  # noqa: SLF001  # paho's client
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise TransportError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except asyncio.CancelledError:  # a stop while connecting (agent/node.py)
            # aiomqtt's wait cancelled its `_connected` future, on which its disconnect callback would raise when
            # the reset closes the socket (an error logged by the loop); a fresh one, as aiomqtt makes itself after a
            # failed connect, lets the callback see "not connected yet" and return.
            client._connected = asyncio.get_running_loop().create_future()  # noqa: SLF001
            _reset(client)
            raise
        self._client = client
        try:
            yield _MqttSession(client)
        finally:
            self._client = None
            with contextlib.suppress(aiomqtt.MqttError, OSError, RuntimeError):
                await client.__aexit__(None, None, None)
