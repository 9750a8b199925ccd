"""Assign -> result round trip through Mosquitto with real agent processes, at several offered rates.

    python bench/dispatch.py [--agents 4] [--seconds 5] [--rates 100,200,500,1000]

A driver (the hub's side of the protocol: signed assigns out, verified results in, acks back) offers `echo` steps
at a fixed rate spread over the agents and measures, per step, the time from publishing the assign to receiving
the signed result. Side by side in the same run: a bare MQTT echo round trip (publish -> subscriber -> publish back,
no signing, no agent) through the same broker, which is the floor any protocol adds to.
Target (issue 5): p50 < 10 ms and p99 < 50 ms at 1,000 steps/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiomqtt  # noqa: E402
from hubdouble import NO_DELAY, HubDouble  # noqa: E402

from protocols import Assign  # noqa: E402
from tests.agentprocess import AgentProcess  # noqa: E402
from tests.brokers import HOST, Broker  # noqa: E402


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else float("nan")


async def bare_round_trip(broker: Broker, n: int = 500) -> list[float]:
    out: list[float] = []
    async with aiomqtt.Client(HOST, broker.port, identifier="echo", socket_options=NO_DELAY) as echo, \
            aiomqtt.Client(HOST, broker.port, identifier="ping", socket_options=NO_DELAY) as ping:
        await echo.subscribe("bench/ping", qos=1)
        await ping.subscribe("bench/pong", qos=1)

        async def reflect() -> None:
            async for message in echo.messages:
                await echo.publish("bench/pong", message.payload, qos=1)

        replies: asyncio.Queue[object] = asyncio.Queue()

        async def collect() -> None:
            async for message in ping.messages:
                replies.put_nowait(message)

        tasks = [asyncio.create_task(reflect()), asyncio.create_task(collect())]
        for _ in range(n):
            started = time.perf_counter()
            await ping.publish("bench/ping", b"x" * 200, qos=1)
            await asyncio.wait_for(replies.get(), 5)
            out.append((time.perf_counter() - started) * 1000)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out


async def offered(hub: HubDouble, nodes: list[str], rate: float, seconds: float, tag: str) -> tuple[list[float], float]:
    sent: dict[str, float] = {}
    latencies: dict[str, float] = {}
    done = asyncio.Event()
    total = int(rate * seconds)
    original = hub._changed

    class Watch(asyncio.Event):
        def set(self) -> None:
            for seen in hub.seen[watch.position:]:
                body = seen.message.body
                attempt = getattr(body, "attempt", None)
                if seen.message.header.type == "result" and attempt in sent and attempt not in latencies:
                    latencies[attempt] = (seen.at - sent[attempt]) * 1000
            watch.position = len(hub.seen)
            if len(latencies) >= total:
                done.set()
            original.set()

    watch = Watch()
    watch.position = len(hub.seen)  # type: ignore[attr-defined]
    hub._changed = watch
    started = time.monotonic()
    for i in range(total):
        due = started + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        attempt = f"{tag}-{i}"
        node = nodes[i % len(nodes)]
        sent[attempt] = time.monotonic()
        hub.send_nowait(node, Assign(f"run-{tag}", f"s{i}", attempt, 1, "echo", {"i": i}, 30))
    offered_for = time.monotonic() - started
    try:
        await asyncio.wait_for(done.wait(), 30)
    except asyncio.TimeoutError:
        pass
    hub._changed = original
    achieved = len(latencies) / max(offered_for, 1e-9)
    return list(latencies.values()), achieved


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker("mosquitto", tmp / "broker").start()
        try:
            bare = await bare_round_trip(broker)
            async with HubDouble(broker, "bench") as hub:
                nodes = [f"a{i}" for i in range(args.agents)]
                agents = [AgentProcess(broker, "bench", n, tmp / n / "data", hub.public_key_hex,
                                       ("--max-concurrent", "256", "--heartbeat", "5", "--telemetry", "30",
                                        "--log-level", "warning")).start() for n in nodes]
                try:
                    await hub.wait_for(lambda: all(hub.of("birth", n) for n in nodes), 60, "agents")
                    await offered(hub, nodes, 50, 1, "warm")
                    print(f"{len(nodes)} agent processes, Mosquitto on loopback, echo steps, signed both ways, "
                          f"results fsync'd by the agent before sending\n")
                    print(f"bare MQTT round trip (QoS 1 there and back, no signing): p50 {pct(bare, 50):.2f} ms, "
                          f"p99 {pct(bare, 99):.2f} ms\n")
                    print(f"{'offered/s':>9s} {'done/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} "
                          f"{'p50 / bare p50':>15s}")
                    for rate in args.rates:
                        lat, achieved = await offered(hub, nodes, rate, args.seconds, f"r{rate:g}")
                        if not lat:
                            print(f"{rate:9.0f} no results")
                            continue
                        print(f"{rate:9.0f} {achieved:8.0f} {pct(lat, 50):8.1f} {pct(lat, 99):8.1f} "
                              f"{max(lat):8.1f} {pct(lat, 50) / statistics.median(bare):14.1f}x")
                finally:
                    for agent in agents:
                        agent.stop()
        finally:
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",")], default=[100, 200, 500, 1000])
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
