"""The JSON mirror's decisions (hub/mirror.py) and the per-node gauges (hub/metrics.py), on a real core with a
clock the test moves: what is published, when, what is cleared, and that the mirror's tree is outside what the hub
reads. tests/system/test_integrations_e2e.py runs the same through a real broker, hub and agents."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hub.eventlog import apply_logged
from hub.events import (AttemptAssigned, Event, NodeBorn, NodeFailed, NodeRemoved, RunCancelRequested, RunSubmitted,
                        StepReported)
from hub.intake import Intake
from hub.metrics import HubMetrics, _NodeTelemetryCollector
from hub.mirror import CLEAR, JsonMirror, MirrorSettings, MirrorTopics
from hub.scheduler import place
from hub.service import NODE_KINDS_READ, NodeView
from hub.state import Core
from hub.workflow import workflow_from_data
from protocols import Keyring, ProtocolError, Receiver, Telemetry, Topic, TopicFilter
from protocols.topics import NODE_KINDS

FLEET = "plant-1"
CAPS = ("noop", "echo", "sleep")
GAUGE_NAMES = ("fleetflow_node_cpu_percent", "fleetflow_node_memory_percent", "fleetflow_node_disk_percent",
               "fleetflow_node_temperature_celsius", "fleetflow_node_metrics_left_out")


def fake_hub(node_metrics: int = 0) -> Any:
    """What the mirror and the collectors read of a hub: its core, views and settings (no process, no broker)."""
    hub = SimpleNamespace(core=Core(), views=collections.defaultdict(NodeView), transport=None,
                          config=SimpleNamespace(fleet=FLEET, node_metrics=node_metrics),
                          signer=SimpleNamespace(boot=3),
                          intake=SimpleNamespace(queued={}, shed={}, refused=collections.Counter()),
                          liveness_paused=False)
    hub.metrics = HubMetrics(hub)  # type: ignore[arg-type]
    return hub


class Mirror:
    """A mirror on a fake hub, driven the way the hub drives it: events applied, telemetry sampled, a clock."""

    def __init__(self, interval: float = 1.0) -> None:
        self.hub = fake_hub()
        self.mirror = JsonMirror(self.hub, MirrorSettings(interval), transport=object())  # type: ignore[arg-type]

    def apply(self, event: Event) -> None:
        apply_logged(self.hub.core, event)
        self.mirror.applied(event)

    def born(self, node: str, at: int, version: str = "1.2.3", **labels: str) -> None:
        self.hub.views[node].version = version
        self.apply(NodeBorn(at, node, 4, "rpi4", labels, CAPS, 2, {"cores": 4}, (), 0.5))

    def sample(self, node: str, at: int, **metrics: float) -> None:
        view = self.hub.views[node]
        view.telemetry, view.telemetry_at = dict(metrics), at
        self.mirror.node_message(node, Telemetry(dict(metrics)))

    def collect(self, now: float) -> dict[str, bytes]:
        """Publishes due at `now`, by topic; each is taken as published (as a broker that acks would)."""
        due, _ = self.mirror.collect(now)
        for key, payload in due:
            self.mirror._published(key, payload)
        return {self.mirror.topics.node(*key): payload for key, payload in due}


def topic(node: str, kind: str) -> str:
    return MirrorTopics(FLEET).node(node, kind)


def test_state_and_telemetry_are_what_the_hub_holds_and_go_out_on_change_only() -> None:
    m = Mirror()
    m.born("n1", 1_000, site="a")
    m.sample("n1", 1_100, cpu=12.5, mem=40.0)
    out = m.collect(10.0)
    assert json.loads(out[topic("n1", "state")]) == {
        "node": "n1", "liveness": "online", "health": "healthy", "labels": {"site": "a"}, "profile": "rpi4",
        "running": 0, "draining": False, "version": "1.2.3", "boot": 4, "changed_at": 1_000}
    assert json.loads(out[topic("n1", "telemetry")]) == {"node": "n1", "at": 1_100,
                                                         "metrics": {"cpu": 12.5, "mem": 40.0}}
    # The same facts again (a periodic comparison, a heartbeat-only batch): nothing to publish.
    m.mirror.mark_all()
    assert m.collect(20.0) == {}
    m.sample("n1", 1_100, cpu=12.5, mem=40.0)
    assert m.collect(30.0) == {}


def test_changes_to_one_node_go_out_at_most_once_per_interval_and_the_last_one_always_does() -> None:
    m = Mirror(interval=1.0)
    m.born("n1", 1_000)
    m.born("n2", 1_000)
    m.sample("n1", 1_000, cpu=1.0)
    assert topic("n1", "telemetry") in m.collect(10.0)
    m.sample("n1", 1_200, cpu=2.0)
    m.sample("n1", 1_400, cpu=3.0)
    m.sample("n2", 1_400, cpu=9.0)  # another node is not held back by n1's interval
    assert set(m.collect(10.4)) == {topic("n2", "telemetry")}
    due, wait = m.mirror.collect(10.5)
    assert due == [] and wait == pytest.approx(0.5)
    out = m.collect(11.0)
    assert json.loads(out[topic("n1", "telemetry")])["metrics"] == {"cpu": 3.0}  # the latest, not each sample
    assert m.collect(30.0) == {}


def test_liveness_and_running_steps_follow_the_core_including_a_run_cancelled() -> None:
    m = Mirror()
    m.born("n1", 1_000)
    m.collect(10.0)
    spec = workflow_from_data({"name": "w", "version": "1.0.0", "steps": [{"id": "a", "uses": "sleep"}]}
                              ).model_dump(by_alias=True, mode="json")
    m.apply(RunSubmitted(2_000, "r1", spec, {}, None, 10**12))
    (assigned,) = [e for e in place(m.hub.core, 2_000) if isinstance(e, AttemptAssigned)]
    m.apply(assigned)
    m.apply(StepReported(2_100, "n1", assigned.attempt, assigned.fence, "started"))
    assert json.loads(m.collect(20.0)[topic("n1", "state")])["running"] == 1
    # A run-level event ends the attempt: it names no node, and the mirror still finds n1.
    m.apply(RunCancelRequested(3_000, "r1", "operator", False))
    assert json.loads(m.collect(30.0)[topic("n1", "state")])["running"] == 0
    m.apply(NodeFailed(4_000, "n1", "no heartbeat"))
    state = json.loads(m.collect(40.0)[topic("n1", "state")])
    assert state["liveness"] == "failed" and state["changed_at"] == 4_000


def test_a_removed_node_is_cleared_on_both_topics_and_a_forgotten_one_leaves_nothing_behind() -> None:
    m = Mirror()
    m.born("n1", 1_000)
    m.sample("n1", 1_000, cpu=1.0)
    m.collect(10.0)
    m.apply(NodeRemoved(2_000, "n1", "revoked by an operator"))
    assert m.collect(20.0) == {topic("n1", "state"): CLEAR, topic("n1", "telemetry"): CLEAR}
    m.sample("n1", 2_500, cpu=2.0)  # refused traffic never gets this far, and a removed node stays cleared
    m.mirror.mark_all()
    assert m.collect(30.0) == {}
    m.apply(NodeRemoved(3_000, "n1", "deleted by an operator", forget=True))
    assert m.collect(40.0) == {}
    assert not m.mirror.sent and not m.mirror.last  # nothing kept for a node the hub forgot
    # Deleted outright (never revoked): cleared, then forgotten.
    m.born("n2", 5_000)
    m.collect(50.0)
    m.apply(NodeRemoved(6_000, "n2", "deleted by an operator", forget=True))
    assert m.collect(60.0) == {topic("n2", "state"): CLEAR, topic("n2", "telemetry"): CLEAR}
    assert not m.mirror.sent


def test_nothing_is_published_or_kept_when_the_mirror_is_off() -> None:
    hub = fake_hub()
    mirror = JsonMirror(hub, None, transport=object())  # type: ignore[arg-type]
    apply_logged(hub.core, NodeBorn(1_000, "n1", 1, "rpi4", {}, CAPS, 1, {}, (), 0.5))
    mirror.applied(NodeBorn(1_000, "n1", 1, "rpi4", {}, CAPS, 1, {}, (), 0.5))
    mirror.node_message("n1", Telemetry({"cpu": 1.0}))
    assert not mirror.enabled and not any(mirror.dirty.values())


def test_the_mirror_tree_is_outside_what_the_hub_and_the_agents_read() -> None:
    topics = MirrorTopics(FLEET)
    mine = [topics.hub_state, topics.node("n1", "state"), topics.node("n1", "telemetry")]
    signed_filters = [TopicFilter.node_kind(FLEET, kind) for kind in NODE_KINDS]  # every kind, `cmd` included
    signed_filters.append(TopicFilter(str(Topic.hub_state(FLEET))))
    assert {f.value for f in signed_filters} >= {f"fleetflow/v1/{FLEET}/node/+/{k}" for k in NODE_KINDS_READ}
    intake = Intake(FLEET, Receiver(FLEET, Keyring()), lambda: 0)
    for name in mine:
        with pytest.raises(ProtocolError):
            Topic.parse(name)
        assert not any(f.matches(name) for f in signed_filters), name
        assert intake.offer(name, b'{"liveness":"online"}') is False
    assert intake.qsize() == 0 and not intake.refused and not intake.shed and not intake.queued
    with pytest.raises(ProtocolError):
        topics.node("n1/+", "state")  # an id is checked before it is put in a topic


def test_node_gauges_cover_live_nodes_up_to_the_cap_and_count_the_rest() -> None:
    hub = fake_hub(node_metrics=2)
    for node, profile in (("n3", "jetson"), ("n1", "rpi4"), ("n2", "rpi4"), ("n4", "rpi4")):
        apply_logged(hub.core, NodeBorn(1_000, node, 1, profile, {}, CAPS, 1, {}, (), 0.5))
        hub.views[node].telemetry = {"cpu": 10.0 + int(node[1]), "mem": 50.0, "disk": 70.0, "temp": 40.0}
    apply_logged(hub.core, NodeFailed(2_000, "n4", "no heartbeat"))  # its last sample is not its present
    families = {f.name: f for f in _NodeTelemetryCollector(hub, 2).collect()}
    cpu = {s.labels["node"]: (s.labels["profile"], s.value) for s in families["fleetflow_node_cpu_percent"].samples}
    assert cpu == {"n1": ("rpi4", 11.0), "n2": ("rpi4", 12.0)}  # the first two live nodes by id
    assert {s.labels["node"] for s in families["fleetflow_node_temperature_celsius"].samples} == {"n1", "n2"}
    assert families["fleetflow_node_metrics_left_out"].samples[0].value == 1  # n3; n4 is failed, not left out
    # Through the hub's own registry: there only when enabled.
    assert b'fleetflow_node_cpu_percent{node="n1",profile="rpi4"} 11.0' in hub.metrics.render()
    hub.config.node_metrics = 0
    off = HubMetrics(hub).render().decode()
    assert not [n for n in GAUGE_NAMES if n in off], off


def test_the_settings_are_off_by_default_and_come_from_flags_environment_or_file(tmp_path: Path) -> None:
    from hub.config import ConfigError, load_hub_settings
    from hub.health import Policy

    file = tmp_path / "hub.toml"
    file.write_text('broker = "mqtt://127.0.0.1:1"\nfleet = "plant-1"\ndata = "/tmp/d"\n')
    config = load_hub_settings({}, file, {}).hub_config(Policy())
    assert config.json_mirror is None and config.node_metrics == 0
    file.write_text(file.read_text() + "json_mirror = true\njson_mirror_interval = 2.5\nnode_metrics_max = 7\n")
    config = load_hub_settings({}, file, {"FLEETFLOW_NODE_METRICS": "true"}).hub_config(Policy())
    assert config.json_mirror == MirrorSettings(2.5) and config.node_metrics == 7
    config = load_hub_settings({"json_mirror_interval": 0.5, "node_metrics": False}, file,
                               {"FLEETFLOW_NODE_METRICS": "true"}).hub_config(Policy())
    assert config.json_mirror == MirrorSettings(0.5) and config.node_metrics == 0
    for bad, says in (({"json_mirror_interval": 0}, "--json-mirror-interval: must be greater than 0"),
                      ({"json_mirror_interval": 7200}, "--json-mirror-interval: at most 3600 seconds"),
                      ({"node_metrics_max": 0}, "--node-metrics-max: must be a positive integer")):
        with pytest.raises(ConfigError, match=says):
            load_hub_settings(bad, file, {})
