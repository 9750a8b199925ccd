"""Two clients exchange signed messages through real brokers; tampered, replayed and cross-topic ones are refused."""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import nacl.signing

from agent.runtime.clock import now_ms
from protocols import Heartbeat, Keyring, ProtocolError, Receiver, Signer, Telemetry, TopicFilter
from tests.brokers import HOST, Broker


async def exchange(broker: Broker) -> tuple[list[str], list[str]]:
    key = nacl.signing.SigningKey.generate()
    signer = Signer(key, "itest", "n1", boot=1)
    receiver = Receiver("itest", Keyring([("n1", bytes(key.verify_key))]))
    accepted: list[str] = []
    refused: list[str] = []
    async with aiomqtt.Client(HOST, broker.port, identifier="rx") as rx, \
            aiomqtt.Client(HOST, broker.port, identifier="tx") as tx:
        await rx.subscribe("fleetflow/v1/itest/#", qos=1)
        hb = signer.seal(Heartbeat(running=1), now_ms())
        tel = signer.seal(Telemetry({"cpu": 3.0}), now_ms())
        tampered = bytearray(tel.payload)
        tampered[-10] ^= 0xFF
        sends = [
            (hb.topic, hb.payload),                      # accepted
            (tel.topic, tel.payload),                    # accepted
            (hb.topic, hb.payload),                      # replayed
            (tel.topic.replace("/tel", "/hb"), tel.payload),  # cross-topic
            (tel.topic, bytes(tampered)),                # tampered
            ("fleetflow/v1/itest/node/n1/hb", b"\x00" * 70_000),  # too large
        ]
        for topic, payload in sends:
            await tx.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 10
        async with asyncio.timeout(10):
            async for message in rx.messages:
                try:
                    got = receiver.receive(str(message.topic), bytes(message.payload), now_ms())  # type: ignore[arg-type]
                    accepted.append(got.header.type)
                except ProtocolError as exc:
                    refused.append(exc.reason)
                if len(accepted) + len(refused) == len(sends) or time.monotonic() > deadline:
                    break
    return accepted, refused


def test_signed_messages_through_a_real_broker(broker: Broker) -> None:
    accepted, refused = asyncio.run(exchange(broker))
    assert accepted == ["hb", "tel"]
    assert sorted(refused) == sorted(["replayed", "wrong-topic", "bad-signature", "too-large"])


def test_filter_matches_what_the_broker_routes(broker: Broker) -> None:
    async def run() -> list[str]:
        seen = []
        async with aiomqtt.Client(HOST, broker.port) as client:
            f = TopicFilter.node_kind("itest", "hb")
            await client.subscribe(str(f), qos=1)
            for topic in ("fleetflow/v1/itest/node/a/hb", "fleetflow/v1/itest/node/a/tel", "fleetflow/v1/itest/node/b/hb"):
                await client.publish(topic, b"x", qos=1)
            async with asyncio.timeout(5):
                async for message in client.messages:
                    assert f.matches(str(message.topic))
                    seen.append(str(message.topic))
                    if len(seen) == 2:
                        break
        return seen

    assert sorted(asyncio.run(run())) == ["fleetflow/v1/itest/node/a/hb", "fleetflow/v1/itest/node/b/hb"]
