"""Prometheus metrics for the hub (prometheus-client, a registry of its own so tests can run several hubs)."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .service import Hub


class _StateCollector(Collector):
    """Nodes and runs by state, read from the core at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        core = self.hub.core
        nodes = GaugeMetricFamily("fleetflow_nodes", "Nodes by liveness", labels=["state"])
        for state, count in sorted(collections.Counter(str(n.state) for n in core.nodes.values()).items()):
            nodes.add_metric([state], count)
        yield nodes
        runs = GaugeMetricFamily("fleetflow_runs", "Runs by state", labels=["state"])
        for state, count in sorted(collections.Counter(str(r.state) for r in core.runs.values()).items()):
            runs.add_metric([state], count)
        yield runs
        queue = GaugeMetricFamily("fleetflow_queue_steps", "Steps waiting for placement")
        queue.add_metric([], len(core.queue))
        yield queue
        stale = GaugeMetricFamily("fleetflow_stale_reports", "Reports from attempts the hub had moved on from")
        stale.add_metric([], core.counters.stale_reports)
        yield stale
        refused = GaugeMetricFamily("fleetflow_refused_attempts", "Assignments nodes refused (busy, outbox full, ...)")
        refused.add_metric([], core.counters.refusals)
        yield refused
        lost = GaugeMetricFamily("fleetflow_lost_attempts", "Attempts lost (node failure, timeout, migration)")
        lost.add_metric([], core.counters.lost_attempts)
        yield lost
        intake = self.hub.intake
        queued = CounterMetricFamily("fleetflow_intake_queued", "Messages screened and queued for the core, by kind",
                                     labels=["kind"])
        for kind, count in sorted(intake.queued.items()):
            queued.add_metric([kind], count)
        yield queued
        shed = CounterMetricFamily("fleetflow_intake_shed", "Messages dropped unprocessed because the hub was behind "
                                   "or a sender over its quota, by kind and reason", labels=["kind", "reason"])
        for (kind, reason), count in sorted(intake.shed.items()):
            shed.add_metric([kind, reason], count)
        yield shed
        # One count of refusals by reason, whether screening (before any signature check) or full verification
        # refused the message: an operator or a checker asks "was it refused", not "at which stage".
        rejected = CounterMetricFamily("fleetflow_rejected", "Messages refused, by reason", labels=["reason"])
        for reason, count in sorted((intake.refused + self.hub.metrics.rejected).items()):
            rejected.add_metric([reason], count)
        yield rejected
        conflicts = GaugeMetricFamily("fleetflow_node_conflicts", "Nodes whose identity two devices use (a cloned "
                                      "data directory): see `fleetflow nodes show`")
        conflicts.add_metric([], sum(1 for n in core.nodes.values() if n.conflict is not None))
        yield conflicts
        paused = GaugeMetricFamily("fleetflow_liveness_suspended", "1 while the hub is behind and decides no liveness")
        paused.add_metric([], 1 if self.hub.liveness_paused else 0)
        yield paused


# Telemetry name (as agents report it, agent/telemetry.py) -> per-node gauge.
NODE_GAUGES = (("cpu", "fleetflow_node_cpu_percent", "CPU use of the node, percent"),
               ("mem", "fleetflow_node_memory_percent", "Memory in use on the node, percent"),
               ("disk", "fleetflow_node_disk_percent", "Disk in use on the node, percent"),
               ("temp", "fleetflow_node_temperature_celsius", "Highest temperature sensor of the node, Celsius"))
LIVE = ("online", "suspected")


class _NodeTelemetryCollector(Collector):
    """`--node-metrics`: each live node's latest CPU, memory, disk and temperature, read from the hub's views at
    scrape time. A node id and a profile per series: the cap (`--node-metrics-max`, the first nodes by id, so the set
    is stable from scrape to scrape) bounds the series a large fleet makes, and the nodes beyond it are counted."""

    def __init__(self, hub: Hub, cap: int) -> None:
        self.hub, self.cap = hub, cap

    def collect(self) -> Iterator[GaugeMetricFamily]:
        core, views = self.hub.core, self.hub.views
        # A failed or offline node's last sample is not its present: it is left out (fleetflow_nodes counts it).
        live = sorted(n for n, node in core.nodes.items()
                      if node.state in LIVE and not node.removed and n in views and views[n].telemetry)
        families = [GaugeMetricFamily(name, text, labels=["node", "profile"]) for _, name, text in NODE_GAUGES]
        for node_id in live[:self.cap]:
            telemetry, labels = views[node_id].telemetry, [node_id, core.nodes[node_id].profile]
            for (metric, _, _), family in zip(NODE_GAUGES, families):
                if metric in telemetry:
                    family.add_metric(labels, telemetry[metric])
        yield from families
        left_out = GaugeMetricFamily("fleetflow_node_metrics_left_out", "Live nodes with telemetry not exported "
                                     "per node at this scrape: over --node-metrics-max")
        left_out.add_metric([], max(0, len(live) - self.cap))
        yield left_out


class HubMetrics:
    def __init__(self, hub: Hub) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter("fleetflow_messages", "Messages received, by type and verdict", ["type", "verdict"],
                                registry=self.registry)
        self._accepted: dict[str, Any] = {}  # message type -> its "accepted" child of `messages`
        self.rejected: collections.Counter[str] = collections.Counter()  # after screening (see the collector)
        self.decisions = Counter("fleetflow_decisions", "Core decisions, by kind", ["kind"], registry=self.registry)
        self.step_latency = Histogram("fleetflow_step_seconds", "Step run time, started to result",
                                      registry=self.registry,
                                      buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.journal_commit = Histogram("fleetflow_journal_commit_seconds", "Journal group commit latency",
                                        registry=self.registry,
                                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.health_changes = Counter("fleetflow_health_changes", "Node health classification changes, by new health",
                                      ["health"], registry=self.registry)
        self.actions = Counter("fleetflow_adaptation_actions", "Adaptation actions taken, by action", ["action"],
                               registry=self.registry)
        # 0.75 as well as 1: with an edge only at 1 s, a p99 anywhere between 0.5 and 1 s reads "<= 1 s", which cannot
        # show a target of "under 1 s" (a large fleet's, issue 17) met.
        self.ingest_lag = Histogram("fleetflow_ingest_lag_seconds", "Time from receiving a message to applying it",
                                    registry=self.registry,
                                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10))
        self.enrollments = Counter("fleetflow_enroll_requests", "Enroll requests, by the verdict they got",
                                   ["verdict"], registry=self.registry)
        self.enroll_dropped = Counter("fleetflow_enroll_pending_dropped",
                                      "Pending enroll requests dropped, oldest first, to stay under the cap",
                                      registry=self.registry)
        self.registry.register(_StateCollector(hub))
        if hub.config.node_metrics > 0:
            self.registry.register(_NodeTelemetryCollector(hub, hub.config.node_metrics))

    def accepted(self, message_type: str) -> None:
        """One message of this type accepted. Once per message ingested: the labelled child is looked up once per type
        (prometheus_client's `labels()` costs more than the increment)."""
        child = self._accepted.get(message_type)
        if child is None:
            child = self._accepted[message_type] = self.messages.labels(message_type, "accepted")
        child.inc()

    def count_decision(self, event: Any) -> None:
        self.decisions.labels(event.KIND).inc()
        self.count_adaptation(event)

    def count_adaptation(self, event: Any) -> None:
        kind = getattr(event, "KIND", "")
        if kind == "health_changed":
            self.health_changes.labels(event.health).inc()
        elif kind == "action_taken":
            self.actions.labels(event.action).inc()
        elif kind == "breaker_changed":
            self.actions.labels(f"breaker_{event.state}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
