"""Hub ingest through Mosquitto: messages a real `fleetflow hub run` accepts per second, against the same run's
single-core bare PyNaCl verify rate (issue 17, item 2), and the same hub with 2 ingest workers against 1 (item 3).

    python bench/ingest.py [--nodes 2000] [--seconds 8] [--smoke]

Thousands of node identities are enrolled in the hub's registry before it starts (the hub's own `Registry`, as an
operator's `nodes add` would leave it, written once instead of once per node). Each node's birth, heartbeats and
telemetry are sealed by the agent's own `AgentProtocol` before any clock starts, and the heartbeats and telemetry
are laid out as ready MQTT PUBLISH packets (QoS 0, as agents publish them), so sending costs the load generator
next to nothing. Births go first (QoS 1) and the figure starts once every node is online.

The hub is kept saturated without being flooded: the generator keeps at most `--window` messages outstanding
(sent, not yet accepted), reading the hub's accepted count from its metrics endpoint. "Accepted" is the hub's own
`fleetflow_messages_total` (verified, decoded, replay-checked, applied), never what the sender counts. Each hub
configuration runs on a fresh broker and data directory with the same pre-signed messages: `--ingest-workers 0`
(one process, item 2), 1 and 2 (item 3), in `--repeat` rounds over all three, each figure the median round. Bare
verify is timed in this process between the hub runs, over the same messages' signed bytes, median of the rounds.

Prints the ingest ratio, then the two-worker ratio, each as `N.NNx` on its own line, then one JSON line with every
figure; the table and per-process CPU go to stderr.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import nacl.signing  # noqa: E402
import psutil  # noqa: E402

from agent.protocol import AgentProtocol, HubTrust, Load, NodeFacts  # noqa: E402
from hub.registry import EnrollPolicy, Registry  # noqa: E402
from protocols import envelope  # noqa: E402
from tests.brokers import HOST, Broker  # noqa: E402
from tests.hubprocess import HubProcess  # noqa: E402
from tests.wire import Publisher  # noqa: E402

FLEET = "ingest"
FACTS = NodeFacts("rpi4", "bench", {"bench": "ingest"}, ("echo",), 2, {"cpu": 4.0})
START_MS = 1_763_900_000_000
ACCEPTED = "fleetflow_messages_total"
# A hub that ingests a whole fleet receives every node's traffic on its own session(s): Mosquitto's default of 1000
# queued messages per client drops QoS 0 messages beyond that whenever the hub falls behind for a moment
# (docs/operations.md, "Brokers").
BROKER_CONFIG = ("max_queued_messages 100000",)
TARGET_INGEST, TARGET_WORKERS = 0.8, 1.5
POLL_S = 0.2  # between two reads of the hub's count while the window is full (each read costs the hub a scrape)


def node_key(i: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(f"bench-ingest-{i}".encode()).digest())


def node_id(i: int) -> str:
    return f"n{i:05d}"


# -- pre-signed traffic ------------------------------------------------------------------------------------------

def _sign_nodes(job: tuple[list[int], int]) -> list[list[tuple[str, bytes]]]:
    """Per node: its birth, then `per_node` heartbeats and telemetry (two to one), as the agent seals them."""
    indices, per_node = job
    out = []
    for i in indices:
        agent = AgentProtocol(node_key(i), FLEET, node_id(i), boot=1, hub=HubTrust(None), facts=FACTS,
                              intervals=(5.0, 10.0), enrolled=True)
        now = START_MS + i
        messages = [agent.birth((), 0, now)]
        for k in range(per_node):
            now += 1000
            if k % 3 == 2:
                messages.append(agent.telemetry({"cpu": 20.0 + k % 30, "mem": 41.5, "disk": 60.0, "temp": 48.0,
                                                 "load1": 0.4, "rss_mb": 31.0}, now))
            else:
                messages.append(agent.heartbeat(Load(k % 2, 2 - k % 2, 0, 0, False), now))
        out.append([(m.topic, m.payload) for m in messages])
    return out


def presign(nodes: int, per_node: int, procs: int) -> list[list[tuple[str, bytes]]]:
    """Every node's messages in seq order, signed in `procs` processes (before any clock starts)."""
    jobs = [(list(range(start, nodes, procs)), per_node) for start in range(procs)]
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_sign_nodes, jobs)
    by_node: dict[int, list[tuple[str, bytes]]] = {}
    for (indices, _), part in zip(jobs, parts):
        by_node.update(zip(indices, part))
    return [by_node[i] for i in range(nodes)]


def publish_packet(topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH, QoS 0 (no packet id)."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + payload
    length, head = len(body), bytearray()
    while True:
        digit, length = length % 128, length // 128
        head.append(digit | (0x80 if length else 0))
        if not length:
            break
    return b"\x30" + bytes(head) + body


@dataclass
class Stream:
    """The heartbeats and telemetry as chunks of PUBLISH packets, one list per connection. A node always goes
    through the same connection, and each connection cycles over its nodes, so every node's messages reach the
    broker in seq order."""

    chunks: list[list[bytes]]
    per_chunk: int
    total: int


def make_stream(traffic: list[list[tuple[str, bytes]]], connections: int, per_chunk: int = 250) -> Stream:
    lanes: list[list[bytes]] = [[] for _ in range(connections)]
    longest = max(len(m) for m in traffic)
    for k in range(1, longest):  # 0 is the birth
        for i, messages in enumerate(traffic):
            if k < len(messages):
                lanes[i % connections].append(publish_packet(*messages[k]))
    chunks = [[b"".join(lane[s:s + per_chunk]) for s in range(0, len(lane) - per_chunk + 1, per_chunk)]
              for lane in lanes]
    return Stream(chunks, per_chunk, sum(len(c) for c in chunks) * per_chunk)


def raw_connection(port: int, client_id: str) -> socket.socket:
    """A bare MQTT 3.1.1 connection that only sends (QoS 0 needs no reading)."""
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ident = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + (600).to_bytes(2, "big") + len(ident).to_bytes(2, "big") + ident
    sock.sendall(b"\x10" + bytes((len(body),)) + body)
    ack = sock.recv(4)
    if ack[:2] != b"\x20\x02" or ack[3:4] != b"\x00":
        raise RuntimeError(f"the broker refused the load generator's connection: {ack!r}")
    return sock


# -- one hub configuration ---------------------------------------------------------------------------------------

def preregister(data: Path, nodes: int) -> None:
    """Enroll every node's key in the registry the hub opens, with its replay state owned by that key (what
    `nodes add` leaves behind); one registry write for all of them."""
    data.mkdir(parents=True, exist_ok=True)
    registry = Registry(data / "nodes.json")
    admit = EnrollPolicy(auto_accept=True)
    for i in range(nodes):
        registry.request(node_id(i), bytes(node_key(i).verify_key), FACTS.profile, {}, START_MS, admit)
        registry.trusted(node_id(i))
    registry.flush()
    registry.close()


class Scraper:
    """The hub's counters the generator paces itself by, summed by family, over one kept-alive connection (a new
    one per read would cost the generator more than the sending)."""

    def __init__(self, hub: HubProcess) -> None:
        self.client = httpx.Client(base_url=hub.url, headers={"Authorization": f"Bearer {hub.token}"}, timeout=60)

    def __call__(self) -> dict[str, float]:
        response = self.client.get("/metrics")
        response.raise_for_status()
        return counts_of(response.text)

    def close(self) -> None:
        self.client.close()


def counts_of(metrics: str) -> dict[str, float]:
    wanted = (ACCEPTED, "fleetflow_intake_shed_total", "fleetflow_rejected_total")
    totals = dict.fromkeys(wanted, 0.0)
    online = 0.0
    for line in metrics.splitlines():
        if line.startswith('fleetflow_nodes{state="online"}'):
            online = float(line.rsplit(" ", 1)[1])
        for name in wanted:
            if line.startswith(name + "{"):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return {**totals, "online": online}


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in processes.items():
        try:
            times = proc.cpu_times()
            out[name] = times.user + times.system
        except psutil.Error:
            out[name] = 0.0
    return out


@dataclass
class RunResult:
    workers: int
    rate: float
    accepted: int
    seconds: float
    cpu: dict[str, int] = field(default_factory=dict)  # % of one core over the measured window
    lost: int = 0      # sent, never counted by the hub (dropped on the way), the whole run
    shed: int = 0      # shed by the hub's intake, over the measured window
    rejected: int = 0  # refused by the hub (any reason), over the measured window


def run_hub(tmp: Path, workers: int, traffic: list[list[tuple[str, bytes]]], stream: Stream, args: Any) -> RunResult:
    name = f"w{workers}"
    broker = Broker("mosquitto", tmp / f"broker-{name}", extra=BROKER_CONFIG)
    data = tmp / f"hub-{name}" / "data"
    extra = ("--ingest-workers", str(workers)) if workers else ()
    hub = HubProcess(broker, FLEET, data, args=("--log-level", "warning", *extra))
    sockets: list[socket.socket] = []
    try:
        broker.start()
        preregister(data, len(traffic))
        hub.start()
        births = Publisher(broker)
        births.publish_all([messages[0] for messages in traffic], qos=1)
        births.close()
        scrape = Scraper(hub)
        hub.wait(lambda: scrape()["online"] >= len(traffic), 120, "every node online")
        sockets = [raw_connection(broker.port, f"load-{name}-{c}") for c in range(len(stream.chunks))]
        assert hub.proc is not None and broker.proc is not None
        processes = {"hub": psutil.Process(hub.proc.pid), "mosquitto": psutil.Process(broker.proc.pid)}
        for i, child in enumerate(processes["hub"].children()):
            processes[f"worker {i + 1}"] = child
        processes["load generator"] = psutil.Process()
        try:
            return pace(scrape, sockets, stream, processes, workers, args)
        finally:
            scrape.close()
    finally:
        for sock in sockets:
            sock.close()
        hub.stop()
        broker.stop()


def start_profiles(processes: dict[str, psutil.Process], seconds: float, out: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy (if installed) sampling the hub and its workers over the measured window, as collapsed stacks."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("--profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return []
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "--format", "raw", "--nonblocking", "-r", "200", "-d", str(int(seconds)),
                              "-p", str(proc.pid), "-o", str(out / f"{name.replace(' ', '-')}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, proc in processes.items() if name == "hub" or name.startswith("worker")]


def top_functions(collapsed: Path, count: int = 12) -> list[tuple[str, float]]:
    """The functions that take the most samples themselves (self time), as a share of every sample."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf.split(" (")[0] + " (" + leaf.rsplit("/", 1)[-1]] += int(samples)
        total += int(samples)
    return [(name, n / total) for name, n in own.most_common(count)] if total else []


def pace(scrape: Scraper, sockets: list[socket.socket], stream: Stream, processes: dict[str, psutil.Process],
         workers: int, args: Any) -> RunResult:
    """Send chunks while fewer than `window` messages are outstanding; measure after the warm-up."""
    first = scrape()
    base = first[ACCEPTED]
    lanes = [iter(c) for c in stream.chunks]
    sent, lost, lane = 0, 0, 0
    counts = first
    started = time.monotonic()
    warm_until, end = started + args.warmup, started + args.warmup + args.seconds
    measuring: tuple[float, dict[str, float], dict[str, float]] | None = None
    profilers: list[subprocess.Popen[bytes]] = []
    last_progress, last_accepted = started, base
    while True:
        now = time.monotonic()
        if measuring is None and now >= warm_until:
            counts = scrape()
            measuring = (time.monotonic(), counts, cpu_seconds(processes))
            if args.profile:
                profilers = start_profiles(processes, args.seconds, Path(args.profile) / f"workers{workers}")
        if now >= end:
            break
        done = counts[ACCEPTED] + counts["fleetflow_intake_shed_total"] + counts["fleetflow_rejected_total"]
        if sent - (done - base) - lost < args.window:
            chunk = next(lanes[lane], None)
            if chunk is None:  # the hub was kept busy until now: the window ends here
                if measuring is None:
                    raise SystemExit(f"the pre-signed stream ran out after {sent} messages: raise --per-node")
                print(f"the pre-signed stream ran out {end - now:.1f} s early (raise --per-node)", file=sys.stderr)
                break
            sockets[lane].sendall(chunk)
            sent += stream.per_chunk
            lane = (lane + 1) % len(sockets)
            continue
        time.sleep(POLL_S)
        counts = scrape()
        if counts[ACCEPTED] != last_accepted:
            last_progress, last_accepted = time.monotonic(), counts[ACCEPTED]
        elif time.monotonic() - last_progress > 2.0:  # dropped on the way: stop waiting for them
            lost = int(sent - (done - base))
    finished = time.monotonic()
    counts = scrape()
    cpu_after = cpu_seconds(processes)
    for profiler in profilers:
        profiler.wait(timeout=60)
    assert measuring is not None
    t0, counts0, cpu0 = measuring
    elapsed = finished - t0
    cpu = {name: round((cpu_after[name] - cpu0[name]) / elapsed * 100) for name in processes}
    accepted = int(counts[ACCEPTED] - counts0[ACCEPTED])
    shed = int(counts["fleetflow_intake_shed_total"] - counts0["fleetflow_intake_shed_total"])
    rejected = int(counts["fleetflow_rejected_total"] - counts0["fleetflow_rejected_total"])
    return RunResult(workers, accepted / elapsed, accepted, elapsed, cpu, lost, shed, rejected)


# -- the reference -----------------------------------------------------------------------------------------------

def verify_rate(traffic: list[list[tuple[str, bytes]]], count: int) -> float:
    """Bare PyNaCl verifies per second on one core, over the signed bytes of the same messages."""
    keys = [node_key(i).verify_key for i in range(len(traffic))]
    work = []
    for k in range(count):
        i = k % len(traffic)
        topic, payload = traffic[i][1 + (k // len(traffic)) % (len(traffic[i]) - 1)]
        parsed = envelope.parse(payload)
        work.append((keys[i], envelope.sig_structure(parsed.protected, topic, parsed.payload), parsed.signature))
    started = time.perf_counter()
    for key, signed, signature in work:
        key.verify(signed, signature)
    return count / (time.perf_counter() - started)


def median_verify(traffic: list[list[tuple[str, bytes]]], rounds: int, count: int) -> Callable[[], float]:
    samples: list[float] = []

    def sample() -> float:
        samples.extend(verify_rate(traffic, count) for _ in range(rounds))
        return statistics.median(samples)

    return sample


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--per-node", type=int, default=100, help="heartbeats and telemetry signed per node")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per hub configuration")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over the configurations; medians reported")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--window", type=int, default=10_000, help="messages outstanding at most")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", default="0,1,2", help="hub configurations (--ingest-workers N)")
    parser.add_argument("--smoke", action="store_true", help="a tiny size, for CI (bench/run_all.py --smoke)")
    parser.add_argument("--profile", metavar="DIR", help="sample the hub and its workers with py-spy over each "
                                                         "measured window; the top functions go to stderr")
    args = parser.parse_args(argv)
    if args.smoke:
        args.nodes, args.per_node, args.seconds, args.warmup, args.window, args.repeat = 50, 600, 1.0, 0.5, 2000, 1
    configs = [int(w) for w in args.workers.split(",")]
    started = time.perf_counter()
    traffic = presign(args.nodes, args.per_node, 2)
    stream = make_stream(traffic, args.connections)
    print(f"{args.nodes} nodes, {stream.total} heartbeats and telemetry pre-signed in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    reference = median_verify(traffic, 3, 2000 if args.smoke else 5000)
    runs: dict[int, list[RunResult]] = {w: [] for w in configs}
    with tempfile.TemporaryDirectory(prefix="fleetflow-ingest-") as tmp_name:
        for round_ in range(args.repeat):  # rounds over every configuration: machine noise hits them alike
            for workers in configs:
                reference()
                r = run_hub(Path(tmp_name) / f"round{round_}", workers, traffic, stream, args)
                runs[workers].append(r)
                print(f"--ingest-workers {workers}: {r.rate:8.0f} accepted/s ({r.accepted} in {r.seconds:.1f} s; "
                      f"{r.lost} lost on the way, {r.shed} shed, {r.rejected} refused); CPU % of one core: "
                      + ", ".join(f"{k} {v}" for k, v in r.cpu.items()), file=sys.stderr)
                for collapsed in sorted(Path(args.profile or tmp_name).glob(f"workers{workers}/*.txt")):
                    print(f"  {collapsed.stem}, self time:", file=sys.stderr)
                    for function, share in top_functions(collapsed):
                        print(f"    {share:6.1%}  {function}", file=sys.stderr)
    # Each configuration's median round (by rate), with the CPU figures of that round.
    results = {w: sorted(rs, key=lambda r: r.rate)[len(rs) // 2] for w, rs in runs.items()}
    verify = reference()
    print(f"bare PyNaCl verify, one core: {verify:8.0f} /s", file=sys.stderr)
    single = results.get(0)
    ingest_ratio = single.rate / verify if single else None
    workers_ratio = results[2].rate / results[1].rate if 1 in results and 2 in results else None
    figures = {"ingest_ratio": ingest_ratio and round(ingest_ratio, 3),
               "workers_ratio": workers_ratio and round(workers_ratio, 3),
               "verify_per_s": round(verify), "target_ingest_ratio": TARGET_INGEST,
               "target_workers_ratio": TARGET_WORKERS, "nodes": args.nodes,
               **{f"ingest_workers{w}_per_s": round(r.rate) for w, r in results.items()},
               **{f"ingest_workers{w}_cpu": r.cpu for w, r in results.items()},
               # what the hub did not accept, in the same median rounds: the rates count accepted messages only
               **{f"ingest_workers{w}_not_accepted": {"lost": r.lost, "shed": r.shed, "rejected": r.rejected}
                  for w, r in results.items()}}
    for ratio in (ingest_ratio, workers_ratio):
        print(f"{ratio:.2f}x" if ratio is not None else "n/a (configuration not run)")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
