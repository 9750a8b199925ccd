"""Work that can never run, end to end: a real hub, one real agent, Mosquitto.

A `with` that cannot fit the wire is refused at submit (422); a step whose executor no node offers fails with the
reason once the policy's grace has passed, and normal work submitted after it still runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.brokers import Broker
from tests.hubprocess import HubProcess

POLICY = """
unrunnable: {grace: 2, max_unanswered: 5}
"""

NOSUCH = """
name: nosuch
version: 1.0.0
steps:
  - id: x
    uses: nosuch
"""

SHELL = """
name: shell-off
version: 1.0.0
steps:
  - id: sh
    uses: shell
    with: {argv: [/bin/true]}
"""

NORMAL = """
name: normal
version: 1.0.0
steps:
  - id: a
    uses: echo
    with: {v: 1}
  - id: b
    uses: echo
    needs: [a]
"""


@pytest.fixture
def hub(mosquitto: Broker, tmp_path: Path) -> Iterator[HubProcess]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with HubProcess(mosquitto, "unrun", tmp_path / "hub", args=("--auto-accept", "--policy", str(policy))) as process:
        yield process


def test_unsendable_with_is_refused_and_unoffered_executors_fail_while_normal_work_runs(hub: HubProcess) -> None:
    hub.agent("n1")
    hub.wait_nodes(1)

    big = {"name": "big", "version": "1.0.0",
           "steps": [{"id": "big", "uses": "echo", "with": {f"part{i}": "x" * 4000 for i in range(20)}}]}
    refused = httpx.post(hub.url + "/runs", json={"workflow": big, "inputs": {}}, timeout=30,
                         headers={"Authorization": f"Bearer {hub.token}"})
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"].startswith("step 'big': `with` cannot be sent: the assignment would be ")
    assert "over the 65,536-byte message limit" in refused.json()["detail"]
    assert not [r for r in hub.get("/runs") if r["workflow"] == "big"]  # nothing was queued

    nosuch = hub.submit(NOSUCH)
    shell = hub.submit(SHELL)  # the agent runs with shell disabled (its default)
    normal = hub.submit(NORMAL)
    assert hub.wait_run(normal, 30)["state"] == "succeeded"
    for run_id, executor in ((nosuch, "nosuch"), (shell, "shell")):
        run = hub.wait_run(run_id, 30)  # the grace is 2 s: well inside this bound
        assert run["state"] == "failed", run
        assert run["error"].endswith(f"no node in the fleet offers executor '{executor}' (disabled or unknown)")
    assert hub.wait_run(hub.submit(NORMAL), 30)["state"] == "succeeded"
