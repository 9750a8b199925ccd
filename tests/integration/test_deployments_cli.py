"""`fleetflow deploy` and `fleetflow deployments` as a user runs them, against a real hub process on a real
Mosquitto with one real agent: the interface scripts rely on (docs/deployments.md), and bad input refused before
anything starts."""

from __future__ import annotations

import json
from pathlib import Path

from tests.brokers import Broker
from tests.cli import fleetflow, ok
from tests.hubprocess import HubProcess

WORKFLOW = """name: app
version: 1.4.2
steps:
  - id: install
    uses: echo
    with: {installed: "1.4.2"}
    compensate: {uses: echo, with: {undo: install}}
"""
BOUND_S = 60  # a system condition on a busy machine


def test_deploy_prints_its_id_and_show_gives_the_documented_json(mosquitto: Broker, tmp_path: Path) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(WORKFLOW)
    with HubProcess(mosquitto, "f-deploy", tmp_path / "hub") as hub:
        hub.agent("n1", "--label", "role=gateway")
        hub.wait_nodes(1)
        data = ("--data", str(hub.data))
        refused = fleetflow("deploy", path, "--target", "role=gateway", "--rate", "0", *data)
        assert refused.returncode == 2 and "--rate: must be 1-1000 per minute" in refused.stderr
        refused = fleetflow("deploy", path, "--target", "rloe=gateway", *data)
        assert refused.returncode == 1 and "--target: unknown selector key 'rloe'" in refused.stderr  # the hub's
        assert hub.get("/deployments") == []  # nothing started

        out = ok("deploy", path, "--target", "role=gateway", "--rate", "120/min", "--abort-threshold", "30",
                 "--abort-min-executed", "2", "--verify", "2s", "--json", *data)
        created = json.loads(out)
        assert list(created) == ["id"] and created["id"].startswith("d-")
        dep_id = created["id"]
        hub.wait(lambda: hub.get(f"/deployments/{dep_id}")["state"] == "succeeded", BOUND_S, "the deployment")

        shown = json.loads(ok("deployments", "show", dep_id, "--json", *data))
        assert {"id", "state", "component", "version", "target", "counts", "waves", "abort_reason", "created_at",
                "executions"} <= set(shown)
        assert (shown["id"], shown["state"], shown["component"], shown["version"]) == (dep_id, "succeeded", "app",
                                                                                      "1.4.2")
        assert shown["target"] == ["role=gateway"] and shown["counts"] == {"succeeded": 1}
        assert shown["abort_reason"] is None
        (execution,) = shown["executions"]
        assert {"node", "state", "version", "version_before", "reason", "wave", "updated_at", "runs"} <= set(execution)
        assert (execution["node"], execution["state"], execution["version"], execution["version_before"]) == (
            "n1", "succeeded", "1.4.2", None)
        (run,) = execution["runs"]
        assert hub.get(f"/runs/{run}")["state"] == "succeeded"  # the run it started, pinned to the node, done
        listed = json.loads(ok("deployments", "list", "-o", "json", *data))
        assert [(d["id"], d["state"]) for d in listed] == [(dep_id, "succeeded")]
        wide = ok("nodes", "list", "-o", "wide", *data)
        assert "app@1.4.2" in wide  # the inventory
        text = ok("deployments", "show", dep_id, *data)
        assert "counts:   succeeded 1" in text and "n1" in text
        again = fleetflow("deployments", "pause", dep_id, *data)
        assert again.returncode == 1 and f"deployment {dep_id} is succeeded: pause needs it running" in again.stderr
