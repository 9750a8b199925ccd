"""The hub as a service: a real `fleetflow hub run --config FILE` (the shape of its systemd unit) with the rest from
the environment comes up with the file's fleet, API address, policy and limits, and a flag still overrides the file."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.brokers import Broker, free_port
from tests.hubprocess import HubProcess

FLEETFLOW = str(Path(sys.executable).parent / "fleetflow")
POLICY = "unrunnable: {grace: 1, max_unanswered: 5}\n"  # the default grace is 30 s
FOUR_STEPS = "name: four\nsteps:\n" + "".join(f"  - {{id: s{i}, uses: echo}}\n" for i in range(4))
# One YAML alias, and an executor no node offers: it can never run.
NEVER_RUNS = """name: never
steps:
  - id: a
    uses: teleport
    with: {x: &x 1, y: *x}
"""


@dataclass
class ConfiguredHub(HubProcess):
    """`fleetflow hub run --config FILE` plus flags, with only the given FLEETFLOW_* variables set."""

    config: Path = Path()
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> ConfiguredHub:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FLEETFLOW_")}
        with open(self.data.parent / "hub.log", "ab") as log:
            self.proc = subprocess.Popen([FLEETFLOW, "hub", "run", "--config", str(self.config), *self.args],
                                         env={**inherited, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.wait(self._api_up, 20, "the hub API")
        return self


def test_a_hub_from_a_config_file_and_the_environment(mosquitto: Broker, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    data = tmp_path / "hub"
    config = tmp_path / "hub.toml"
    config.write_text(f'fleet = "svc-fleet"\ndata = "{data}"\napi = "127.0.0.1:{port}"\npolicy = "{policy}"\n'
                      f'max_workflow_steps = 3\nmax_workflow_aliases = 0\nlog_level = "debug"\n')
    hub = ConfiguredHub(mosquitto, "svc-fleet", data, args=("--max-workflow-aliases", "5"), config=config,
                        env={"FLEETFLOW_BROKER": mosquitto.url})
    with hub:
        assert hub.url == f"http://127.0.0.1:{port}"  # the API where the file put it
        health = hub.get("/health")
        assert health["fleet"] == "svc-fleet" and health["connected"] is True
        # The file's limit: four steps are one too many.
        response = httpx.post(hub.url + "/runs", json={"workflow": FOUR_STEPS, "inputs": {}}, timeout=30,
                              headers={"Authorization": f"Bearer {hub.token}"})
        assert response.status_code == 422 and "over the limit of 3 (--max-workflow-steps)" in response.text
        # The flag over the file's `max_workflow_aliases = 0`: a workflow with an alias is taken.
        run_id = hub.submit(NEVER_RUNS)
        # The file's policy: a step no node can run fails after its 1 s grace (the default waits 30 s).
        run = hub.wait_run(run_id, 15)
        assert run["state"] == "failed" and "can never run" in (run["error"] or ""), run
