"""The integration examples in docs/examples/integrations/ (docs/integrations.md): each loads with the parser its
platform uses, names the mirror's real topics and payload keys and the hub's real metric names, and the COSE
verification script runs, as written, against the protocol's vectors with an independent COSE library (pycose, in
the environment tests/unit/test_vectors.py builds for it)."""

from __future__ import annotations

import collections
import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from hub.eventlog import apply_logged
from hub.events import NodeBorn
from hub.mirror import MirrorTopics, state_payload, telemetry_payload
from protocols import TopicFilter
from tests.unit.test_hub_mirror import fake_hub
from tests.unit.test_vectors import ENVELOPES, PYCOSE_LENIENT, VECTORS, _json, _pycose_python

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples" / "integrations"
FLEET = "plant-1"  # the fleet every example is written for
TOPICS = MirrorTopics(FLEET)
MIRROR = {TOPICS.hub_state, TOPICS.node("press-07", "state"), TOPICS.node("press-07", "telemetry")}


def mirror_payloads() -> dict[str, dict[str, Any]]:
    """A node's state and telemetry as the mirror publishes them, from a core holding that node."""
    hub = fake_hub()
    apply_logged(hub.core, NodeBorn(1_000, "press-07", 2, "rpi4", {"site": "a"}, ("echo",), 1, {}, (), 5.0))
    hub.views["press-07"].version, hub.views["press-07"].telemetry_at = "0.1.0", 1_500
    hub.views["press-07"].telemetry = {"cpu": 1.0, "mem": 2.0, "disk": 3.0, "temp": 4.0, "load1": 0.5, "rss_mb": 60.0}
    return {"state": json.loads(state_payload(hub, "press-07")),
            "telemetry": json.loads(telemetry_payload(hub, "press-07") or b""),
            "hub": {"online": True, "fleet": FLEET, "version": "0.1.0", "boot": 1}}


def in_mirror(topic_or_filter: str) -> bool:
    """A topic of the mirror's tree, or a filter that matches one and nothing outside `.../json/`."""
    return (topic_or_filter.startswith(TOPICS.root + "/")
            and any(TopicFilter(topic_or_filter).matches(t) or t == topic_or_filter for t in MIRROR))


def hub_metric_names() -> set[str]:
    """Every series name the hub's /metrics can show, with per-node gauges on and a node reporting."""
    from prometheus_client.parser import text_string_to_metric_families

    hub = fake_hub(node_metrics=10)
    apply_logged(hub.core, NodeBorn(1_000, "n1", 1, "rpi4", {}, ("echo",), 1, {}, (), 5.0))
    hub.views["n1"].telemetry = {"cpu": 1.0, "mem": 2.0, "disk": 3.0, "temp": 4.0}
    hub.metrics.step_latency.observe(1.0)
    names = set()
    for family in text_string_to_metric_families(hub.metrics.render().decode()):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_the_node_red_flow_loads_is_wired_and_reads_the_mirror_and_sparkplug() -> None:
    flow = json.loads((EXAMPLES / "node-red-flow.json").read_text())
    ids = {n["id"] for n in flow}
    assert len(ids) == len(flow)
    for node in flow:
        assert {target for out in node.get("wires", []) for target in out} <= ids, node["id"]
        if node["type"] in ("mqtt in", "mqtt sparkplug in"):
            assert node["broker"] in ids  # its broker config node is in the flow
        assert node.get("z") is None or node["z"] in ids
    mqtt_in = {n["topic"] for n in flow if n["type"] == "mqtt in"}
    assert mqtt_in and all(in_mirror(t) for t in mqtt_in), mqtt_in
    assert {t.rsplit("/", 1)[1] for t in mqtt_in} == {"state", "telemetry"}
    (sparkplug,) = [n for n in flow if n["type"] == "mqtt sparkplug in"]
    assert sparkplug["topic"].startswith("spBv1.0/")
    assert {"mqtt-broker", "mqtt-sparkplug-broker"} <= {n["type"] for n in flow}
    # The parse function splits the topic: its indexes must be where the mirror puts node id and kind.
    parse = next(n["func"] for n in flow if n["type"] == "function" and "JSON.parse" in n["func"])
    levels = TOPICS.node("press-07", "state").split("/")
    assert f"parts[{levels.index('press-07')}]" in parse and f"parts[{levels.index('state')}]" in parse


def test_the_telegraf_config_parses_and_reads_the_mirror_topics_and_keys() -> None:
    config = tomllib.loads((EXAMPLES / "telegraf.conf").read_text())
    consumers = config["inputs"]["mqtt_consumer"]
    payloads = mirror_payloads()
    topics = [t for c in consumers for t in c["topics"]]
    assert TOPICS.every_node("telemetry") in topics and TOPICS.every_node("state") in topics
    for consumer in consumers:
        assert consumer["data_format"] == "json_v2" and all(in_mirror(t) for t in consumer["topics"])
        (parsing,) = consumer["topic_parsing"]
        kind = parsing["topic"].rsplit("/", 1)[1]
        # The tag named `node` sits where the node id is in the mirror's topic.
        tags = parsing["tags"].split("/")
        assert tags.index("node") == TOPICS.node("press-07", kind).split("/").index("press-07")
        (parser,) = consumer["json_v2"]
        payload = payloads[kind]
        if "timestamp_path" in parser:
            assert parser["timestamp_path"] in payload and parser["timestamp_format"] == "unix_ms"
        for entry in parser.get("field", []) + parser.get("tag", []):
            value: Any = payload
            for key in entry["path"].split("."):
                value = value[key]
            assert not isinstance(value, (dict, list)), entry
    assert "influxdb_v2" in config["outputs"]


def test_the_home_assistant_yaml_parses_and_its_templates_read_real_keys() -> None:
    config = yaml.safe_load((EXAMPLES / "home-assistant.yaml").read_text())
    payloads = mirror_payloads()
    entities = config["sensor"] + config["binary_sensor"]
    assert len({e["unique_id"] for e in entities}) == len(entities)
    for entity in entities:
        topic = entity["state_topic"]
        assert topic in MIRROR, topic
        kind = "hub" if topic == TOPICS.hub_state else topic.rsplit("/", 1)[1]
        for path in re.findall(r"value_json((?:\.\w+)+)", entity["value_template"]):
            value: Any = payloads[kind]
            for key in path.strip(".").split("."):
                assert key in value, (entity["name"], path)
                value = value[key]
        for availability in entity.get("availability", []):
            assert availability["topic"] == TOPICS.hub_state and "online" in availability["value_template"]


def test_the_grafana_dashboard_loads_and_charts_only_metrics_the_hub_exports() -> None:
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"]]
    used = {name for expr in exprs for name in re.findall(r"\bfleetflow_[a-z_]+", expr)}
    assert used - hub_metric_names() == set()
    for must in ("fleetflow_nodes", "fleetflow_runs", "fleetflow_intake_shed_total", "fleetflow_rejected_total",
                 "fleetflow_ingest_lag_seconds_bucket", "fleetflow_node_cpu_percent"):
        assert must in used, must
    grid = collections.Counter((p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"])
    assert max(grid.values()) == 1  # no two panels on one spot


def test_the_prometheus_config_scrapes_the_hub_with_its_token() -> None:
    config = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8470"]  # the hub's default --api


@pytest.fixture(scope="module")
def pycose_python() -> Path:
    return _pycose_python()


def _verify(python: Path, vector: dict[str, Any], tmp_path: Path, *how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), str(EXAMPLES / "verify_envelope.py"), "--public-key", vector["public_key_hex"],
                           "--topic", vector["topic"], *how], capture_output=True, text=True, timeout=120)


def test_the_cose_example_verifies_a_vector_as_written_and_refuses_a_moved_or_tampered_one(
        pycose_python: Path, tmp_path: Path) -> None:
    birth = next(v for v in ENVELOPES if v["name"] == "valid-birth")
    out = _verify(pycose_python, birth, tmp_path, "--hex", birth["envelope_hex"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == birth["payload"]
    raw = tmp_path / "birth.bin"
    raw.write_bytes(bytes.fromhex(birth["envelope_hex"]))
    assert _verify(pycose_python, birth, tmp_path, "--file", str(raw)).returncode == 0
    moved = _verify(pycose_python, {**birth, "topic": birth["topic"].replace("/birth", "/hb")}, tmp_path,
                    "--hex", birth["envelope_hex"])
    assert moved.returncode == 1 and "does not verify" in moved.stderr
    tampered = next(v for v in ENVELOPES if v["name"] == "bad-signature-payload-changed")
    assert _verify(pycose_python, tampered, tmp_path, "--hex", tampered["envelope_hex"]).returncode == 1


def test_the_cose_example_agrees_with_the_vectors(pycose_python: Path, tmp_path: Path) -> None:
    """Its `verify` over every vector, in one process: a valid vector gives exactly its payload; one a generic COSE
    verifier refuses is refused. It may refuse more (a payload that is not a CBOR map, an oversized message)."""
    driver = ("import json, sys; sys.path.insert(0, sys.argv[1]); from verify_envelope import verify\n"
              "out = {}\n"
              "for v in json.load(open(sys.argv[2])):\n"
              "    try: out[v['name']] = verify(bytes.fromhex(v['envelope_hex']), bytes.fromhex(v['public_key_hex']),"
              " v['topic'])\n"
              "    except ValueError as exc: out[v['name']] = 'refused: ' + str(exc)\n"
              "print(json.dumps(out, default=str))\n")
    out = subprocess.run([str(pycose_python), "-c", driver, str(EXAMPLES), str(VECTORS / "envelopes.json")],
                         capture_output=True, text=True, timeout=300, check=True)
    verdicts = json.loads(out.stdout)
    assert set(verdicts) == {v["name"] for v in ENVELOPES}
    for vector in ENVELOPES:
        got = verdicts[vector["name"]]
        if vector["expect"] == "valid":
            assert got == _json(vector["payload"]), vector["name"]
        elif not vector["cose_valid"]:
            assert isinstance(got, str) and got.startswith("refused"), vector["name"]
    # Stricter than pycose alone: trailing bytes after the COSE item are refused, as our receivers do.
    assert all(str(verdicts[name]).startswith("refused") for name in PYCOSE_LENIENT)
