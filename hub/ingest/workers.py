"""The core's side of `hub run --ingest-workers N`: start the worker processes, take their batches, restore each
node's order, and queue the messages in the hub's intake like those of its own session.

Each worker (hub/ingest/worker.py) is `python -m hub.ingest.worker` on one end of a socket pair: a process of its
own, so signature checks and decoding run on every core. Its batches are read on the hub's event loop; the opened
messages go through the `ReorderBuffer` (per node and key, from each message's boot and seq) into the intake, which
screens nothing again but still queues by lane and sheds by quota; enroll requests and messages under no trusted key
go to the intake as if the hub's session had received them. The core loop then runs only the replay check and what
follows (hub/protocol.py), and stays the single writer of the journal, replay marks included.

The workers hear of keys the hub trusts (accepted, added, revoked) within a second; meanwhile the core opens the
messages under a key a worker does not know yet itself (then orders them like the rest), and refuses what a worker
opened under a key the hub no longer trusts. A worker that exits stops the
hub (crash-only, as any of its tasks): a supervisor restarts it from its journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.runtime.timeouts import within
from protocols import FleetflowError, ProtocolError, kid_for

from ..protocol import Opened
from .reorder import Mark, Released, ReorderBuffer
from .worker import Batch, OpenedItem, WorkerSpec, open_message, unpacked

if TYPE_CHECKING:
    from ..service import Hub

log = logging.getLogger("fleetflow.hub.ingest")

TICK_S = 0.025       # how often gaps that waited their timeout are released when nothing arrives
KEYS_EVERY_S = 1.0   # how often the workers' keyrings catch up with the hub's
STOP_WAIT_S = 5.0
PIPE_BYTES = 4 << 20  # a worker's batches in flight to the core (the kernel may cap it at net.core.wmem_max)

class WorkerExited(FleetflowError):
    """An ingest worker process ended while the hub ran."""


@dataclass
class _Process:
    index: int
    proc: subprocess.Popen[bytes]
    conn: Connection
    subscribed: bool = False


class IngestWorkers:
    def __init__(self, hub: Hub, count: int) -> None:
        self.hub, self.count = hub, count
        self.buffer: ReorderBuffer[OpenedItem] = ReorderBuffer(self._mark)
        self.processes: list[_Process] = []
        self._keys: dict[bytes, str] = {}  # public key -> owner, as the workers were last told
        self._ready = asyncio.Event()
        self._exited: _Process | None = None
        self._failure: Exception | None = None
        self.opened_here = 0  # node messages the core opened itself (a key the workers had not heard of yet)
        if count:
            hub.metrics.registry.register(_Collector(self))

    def _mark(self, sender: Hashable) -> Mark | None:
        node = sender[0] if isinstance(sender, tuple) else str(sender)
        window = self.hub.receiver.windows.get(node)
        return window.mark() if window is not None else None

    async def ready(self, stop: asyncio.Event) -> None:
        """Until every worker's session has its subscriptions (at once without workers), or `stop`: the hub
        announces itself online, which makes every node send a birth, only once someone listens for them."""
        if not self.count:
            return
        waits = [asyncio.create_task(self._ready.wait()), asyncio.create_task(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        if not self.count:
            return
        loop = asyncio.get_running_loop()
        try:
            for index in range(self.count):
                worker = self._start(index)
                self.processes.append(worker)
                loop.add_reader(worker.conn.fileno(), self._readable, worker)
            keys_at = time.monotonic()
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(TICK_S, stop.wait())
                self._queue(self.buffer.expire(self.hub.clock()))
                if self._failure is not None:
                    raise self._failure
                if self._exited is not None or any(w.proc.poll() is not None for w in self.processes):
                    worker = self._exited or next(w for w in self.processes if w.proc.poll() is not None)
                    raise WorkerExited(f"ingest worker {worker.index} exited (code {worker.proc.poll()}); its log "
                                       f"lines above say why")
                if time.monotonic() - keys_at >= KEYS_EVERY_S:
                    keys_at = time.monotonic()
                    self._sync_keys()
        finally:
            await self._stop_all(loop)

    # -- workers -----------------------------------------------------------------------------------------------------

    def _start(self, index: int) -> _Process:
        from ..service import NODE_KINDS_READ

        ours, theirs = socket.socketpair()
        # Room for a worker to run ahead while the core loop is busy with a batch, instead of waiting to send.
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIPE_BYTES)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PIPE_BYTES)
        with theirs:
            proc = subprocess.Popen([sys.executable, "-m", "hub.ingest.worker", str(theirs.fileno())],
                                    pass_fds=(theirs.fileno(),))
        conn = Connection(ours.detach())
        config = self.hub.config
        self._keys = {trusted.public_key: trusted.owner for trusted in self.hub.receiver.keyring}
        conn.send(WorkerSpec(index + 1, config.fleet, config.broker_settings(), NODE_KINDS_READ,
                             tuple((owner, key) for key, owner in self._keys.items()), self.hub.receiver.max_size,
                             logging.getLogger("fleetflow").getEffectiveLevel()))
        log.info("ingest worker %d started (pid %d)", index + 1, proc.pid)
        return _Process(index + 1, proc, conn)

    def _sync_keys(self) -> None:
        keys = {trusted.public_key: trusted.owner for trusted in self.hub.receiver.keyring}
        if keys == self._keys:
            return
        added = [(owner, key) for key, owner in keys.items() if self._keys.get(key) != owner]
        removed = [kid_for(key) for key in self._keys if key not in keys]
        self._keys = keys
        for worker in self.processes:
            worker.conn.send(("keys", added, removed))

    async def _stop_all(self, loop: asyncio.AbstractEventLoop) -> None:
        for worker in self.processes:
            loop.remove_reader(worker.conn.fileno())
            with contextlib.suppress(OSError):
                worker.conn.send(("stop",))
        for worker in self.processes:
            try:
                await asyncio.to_thread(worker.proc.wait, STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                await asyncio.to_thread(worker.proc.wait, STOP_WAIT_S)
            worker.conn.close()

    # -- batches -------------------------------------------------------------------------------------------------

    def _readable(self, worker: _Process) -> None:
        """A worker's batch. Runs as an event loop callback, where an exception would only be logged: a failure
        is kept for `run` to raise (crash-only)."""
        try:
            self._take(worker, pickle.loads(worker.conn.recv_bytes()))
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            self._exited = worker
        except Exception as exc:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            self._failure = exc

    def _take(self, worker: _Process, batch: Batch) -> None:
        hub, intake = self.hub, self.hub.intake
        now = hub.clock()
        offer = self.buffer.offer
        opened = batch.opened
        for topic, payload, at in batch.unopened:
            # A key the worker has not heard of yet: opened here, so the node's order is restored all the same.
            try:
                item = open_message(hub.receiver, topic, payload, at)
            except ProtocolError as exc:
                hub.protocol.refused[exc.reason] += 1
                intake.log.warning(exc.reason, f"refused {exc.reason}: {topic[:120]}: {exc}")
                continue
            if item is None:  # an enroll request, or no trusted key at all: the intake screens it as ever
                intake.offer(topic, payload, at=at)
            else:
                self.opened_here += 1
                opened.append(item)
        for held in opened:
            header = held[4]
            self._queue(offer((header.src, held[3]), header.boot, header.seq, held, now))
        if batch.refused:
            hub.protocol.refused.update(batch.refused)
        if batch.backlog_ms > intake.backlog_ms:
            intake.backlog_ms = batch.backlog_ms
        if batch.subscribed is not None:
            worker.subscribed = batch.subscribed
            if all(w.subscribed for w in self.processes) and len(self.processes) == self.count:
                self._ready.set()
            elif not batch.subscribed:
                self._ready.clear()

    def _queue(self, released: list[Released[OpenedItem]]) -> None:
        offer = self.hub.intake.offer
        for entry in released:
            topic, payload, at, kid, header, fields = entry.item
            offer(topic, payload, Opened(unpacked(header, fields), kid, entry.late), at)


class _Collector(Collector):
    def __init__(self, workers: IngestWorkers) -> None:
        self.workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        buffer = self.workers.buffer
        alive = GaugeMetricFamily("fleetflow_ingest_workers", "Ingest worker processes running")
        alive.add_metric([], sum(1 for w in self.workers.processes if w.proc.poll() is None))
        yield alive
        held = GaugeMetricFamily("fleetflow_ingest_reorder_held", "Messages waiting for an earlier one of their node")
        held.add_metric([], buffer.held)
        yield held
        skipped = CounterMetricFamily("fleetflow_ingest_reorder_gaps_skipped", "Gaps in a node's sequence given up "
                                      "on (the message was lost, shed, or waited past the timeout)")
        skipped.add_metric([], buffer.gaps_skipped)
        yield skipped
        here = CounterMetricFamily("fleetflow_ingest_opened_by_core", "Node messages the core opened itself, under a "
                                   "key the workers had not heard of yet (they hear of a new one within a second)")
        here.add_metric([], self.workers.opened_here)
        yield here
        late = CounterMetricFamily("fleetflow_ingest_reorder_late", "Messages that arrived behind later ones of their "
                                   "node (duplicates among them): judged by the replay window, never applied")
        late.add_metric([], buffer.late)
        yield late
