"""The in-memory MQTT broker (agent/runtime/memory.py) keeps the MQTT 3.1.1 rules the hub and agents rely on. Every test
runs on the simulation's virtual-time loop (sim/virtual_time.py), so its delays are free."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.runtime.memory import Faults, MemoryBroker, MemoryTransport, Network, check_filter, topic_matches
from agent.runtime.transport import Session, TransportError, Will
from protocols import LocalProtocolError, TopicFilter
from sim import virtual_time


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return virtual_time.run(test())  # type: ignore[arg-type]


class Inbox:
    """What one subscriber received, read by a task of its own."""

    def __init__(self, session: Session) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._read(session))

    async def _read(self, session: Session) -> None:
        try:
            async for message in session.messages():
                self.got.append(message)
        except TransportError as exc:
            self.error = exc

    def payloads(self) -> list[bytes]:
        return [payload for _, payload in self.got]


@contextlib.asynccontextmanager
async def subscribed(broker: MemoryBroker, name: str, *filters: str, qos: int = 1,
                     will: Will | None = None) -> AsyncIterator[tuple[Session, Inbox]]:
    async with MemoryTransport(broker, name).connect(f"{name}-1", will) as session:
        for topic_filter in filters:
            await session.subscribe(topic_filter, qos)
        inbox = Inbox(session)
        yield session, inbox
        inbox.task.cancel()


async def settle(seconds: float = 5.0) -> None:
    await asyncio.sleep(seconds)  # virtual: costs nothing


def test_topic_filters_follow_the_standard() -> None:
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/d/c")
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c") and topic_matches("#", "a/b")
    assert not topic_matches("a/+", "a") and not topic_matches("a/b", "a/b/c")
    assert not topic_matches("#", "$SYS/x") and not topic_matches("+/x", "$SYS/x") and topic_matches("$SYS/#", "$SYS/x")
    for bad in ("a/#/b", "a/b#", "a+/b", ""):
        with pytest.raises(ValueError):
            check_filter(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "$s", "+", "#"]), min_size=1, max_size=4),
       st.lists(st.sampled_from(["a", "b", "$s", ""]), min_size=1, max_size=4))
def test_the_broker_matches_as_the_protocols_topic_filter_plus_the_dollar_rule(wanted: list[str],
                                                                              levels: list[str]) -> None:
    topic_filter, topic = "/".join(wanted), "/".join(levels)
    try:
        protocol = TopicFilter(topic_filter).matches(topic)
    except LocalProtocolError:  # a filter neither side accepts
        with pytest.raises(ValueError):
            check_filter(topic_filter)
        return
    dollar = topic.startswith("$") and topic_filter[:1] in ("+", "#")
    assert topic_matches(topic_filter, topic) == (protocol and not dollar)


def test_delivered_qos_is_the_lower_of_publish_and_subscription() -> None:
    async def test() -> None:
        network = Network(random.Random(1), Faults(loss=1.0))  # every QoS 0 delivery is lost
        broker = MemoryBroker(network)
        async with subscribed(broker, "qos1", "t/#", qos=1) as (pub, inbox1), \
                subscribed(broker, "qos0", "t/#", qos=0) as (_, inbox0):
            await pub.publish("t/a", b"zero", qos=0)
            await pub.publish("t/b", b"one", qos=1)
            await settle()
        assert inbox1.payloads() == [b"one"]  # QoS 0 may be lost, QoS 1 never on a live connection
        assert inbox0.payloads() == []        # granted QoS 0: the QoS 1 message was delivered at QoS 0, and lost

    run(test)


def test_a_qos1_message_may_arrive_twice_a_qos0_one_never() -> None:
    async def test() -> None:
        broker = MemoryBroker(Network(random.Random(1), Faults(duplicate=1.0)))
        async with subscribed(broker, "sub", "t") as (session, inbox):
            await session.publish("t", b"at-least-once", qos=1)
            await session.publish("t", b"at-most-once", qos=0)
            await settle()
        assert inbox.payloads() == [b"at-least-once", b"at-least-once", b"at-most-once"]
        assert [d.duplicate for d in broker.deliveries] == [False, True, False]

    run(test)


def test_retained_messages_go_to_new_subscriptions_and_an_empty_one_clears_the_topic() -> None:
    async def test() -> None:
        broker = MemoryBroker()
        async with MemoryTransport(broker, "pub").connect("pub-1", None) as pub:
            await pub.publish("state", b"old", qos=1, retain=True)
            await pub.publish("state", b"new", qos=1, retain=True)
            async with subscribed(broker, "late", "state") as (_, late):
                await settle()
                assert late.payloads() == [b"new"]  # only the last retained message
                await pub.publish("state", b"", qos=1, retain=True)
                await settle()
                assert late.payloads() == [b"new", b""]  # current subscribers get the clearing message too
            async with subscribed(broker, "later", "state") as (_, later):
                await settle()
                assert later.payloads() == []  # cleared

    run(test)


def test_the_will_fires_on_an_abort_and_a_takeover_never_on_a_clean_disconnect() -> None:
    async def test() -> None:
        broker = MemoryBroker()
        async with subscribed(broker, "watcher", "death/#") as (_, deaths):
            clean = MemoryTransport(broker, "clean")
            async with clean.connect("clean-1", Will("death/clean", b"clean")):
                pass
            crashed = MemoryTransport(broker, "crashed")
            async with crashed.connect("crashed-1", Will("death/crashed", b"crashed")) as session:
                crashed.abort()
                with pytest.raises(TransportError):
                    await session.closed()
                with pytest.raises(TransportError):
                    await session.publish("x", b"after the crash")
            first, second = MemoryTransport(broker, "first"), MemoryTransport(broker, "second")
            async with first.connect("same-id", Will("death/first", b"first")) as old, second.connect("same-id", None):
                with pytest.raises(TransportError, match="taken over"):
                    await old.closed()
            await settle()
            assert deaths.payloads() == [b"crashed", b"first"]

    run(test)


def test_one_publisher_s_messages_keep_their_order_others_may_overtake() -> None:
    async def test() -> None:
        network = Network(random.Random(7), Faults(delay=0.5, reorder=0.3, hold=2.0))
        broker = MemoryBroker(network)
        async with subscribed(broker, "sub", "t/#") as (_, inbox), \
                MemoryTransport(broker, "a").connect("a-1", None) as a, \
                MemoryTransport(broker, "b").connect("b-1", None) as b:
            for i in range(50):
                await a.publish("t/a", b"a%02d" % i, qos=1)
                await b.publish("t/b", b"b%02d" % i, qos=1)
            await settle(30)
        got = inbox.payloads()
        assert [p for p in got if p.startswith(b"a")] == [b"a%02d" % i for i in range(50)]
        assert [p for p in got if p.startswith(b"b")] == [b"b%02d" % i for i in range(50)]
        interleaved = [p for i in range(50) for p in (b"a%02d" % i, b"b%02d" % i)]
        assert got != interleaved  # across publishers the order did change

    run(test)


def test_a_cut_link_loses_what_crosses_it_and_ends_the_connection_at_keepalive() -> None:
    async def test() -> None:
        broker = MemoryBroker()
        async with subscribed(broker, "hub", "t/#", "death/#") as (hub, inbox):
            node = MemoryTransport(broker, "node")
            async with node.connect("node-1", Will("death/node", b"node died")) as session:
                await session.subscribe("cmd", 1)
                node_inbox = Inbox(session)
                broker.partition("node", notice_after=10.0)
                await session.publish("t/x", b"into the void", qos=1)
                await hub.publish("cmd", b"never arrives", qos=1)
                await settle(5)
                assert inbox.payloads() == [] and node_inbox.payloads() == []
                with pytest.raises(TransportError):  # no new connection while the link is cut
                    async with node.connect("node-2", None):
                        pass
                await settle(10)  # the keepalive noticed: the connection is gone, its Will went out
                assert isinstance(node_inbox.error, TransportError)
            assert inbox.payloads() == [b"node died"]
            assert [r.reached for r in broker.wire if r.sender == "node"] == [False, True]  # the message, the Will
            broker.heal("node")
            async with node.connect("node-3", None) as again:
                await again.publish("t/x", b"back", qos=1)
                await settle()
            assert inbox.payloads() == [b"node died", b"back"]

    run(test)


def test_a_persistent_session_keeps_subscriptions_and_queued_qos1_messages() -> None:
    async def test() -> None:
        broker = MemoryBroker()
        durable = MemoryTransport(broker, "durable", clean_session=False)
        fresh = MemoryTransport(broker, "fresh")
        async with durable.connect("durable", None) as session, fresh.connect("fresh", None) as other:
            await session.subscribe("t", 1)
            await other.subscribe("t", 1)
        async with MemoryTransport(broker, "pub").connect("pub-1", None) as pub:
            await pub.publish("t", b"while away", qos=1)
            await pub.publish("t", b"qos 0 is not kept", qos=0)
        async with durable.connect("durable", None) as session, fresh.connect("fresh", None) as other:
            kept, gone = Inbox(session), Inbox(other)
            await settle()
        assert kept.payloads() == [b"while away"] and gone.payloads() == []

    run(test)


def test_an_incoming_queue_takes_the_deliveries() -> None:
    async def test() -> None:
        taken: list[Any] = []

        class Queue:
            def __init__(self, maxsize: int = 0) -> None:
                self.maxsize = maxsize

            def put_nowait(self, message: Any) -> None:
                taken.append((str(message.topic), message.payload))

        broker = MemoryBroker()
        async with MemoryTransport(broker, "hub", incoming=Queue).connect("hub-1", None) as hub:
            await hub.subscribe("t", 1)
            await hub.publish("t", b"to the intake", qos=1)
            await settle()
        assert taken == [("t", b"to the intake")]

    run(test)
