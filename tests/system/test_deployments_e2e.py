"""Fleet deployments end to end (issue 14): one hub process on a real Mosquitto and 65 simulated devices (the real
agent code, tests/system/deployfleet.py), shared by the tests of this module; each test deploys a component of its
own to nodes of its own. Judged from the hub's journal file (start times, the order of decisions), the CLI's JSON
and the API's; every wait is on a condition with a bound.

Devices: d-00..d-49 (dtest) and d-04b, d-14b, ... d-44b (dtest-bad: every `update` step fails); k-1 (killed);
v-late, v-quick (rebooted while verifying); fc-a, fc-d (dtest), fc-b (dtest-bad), fc-c (dtest-slow) for the forced
cancel; r-1..r-3 (dtest-late, `ring=late`) and r-4 added mid-rollout.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from protocols.manifest import Manifest, seal_manifest
from tests.system.deployfleet import TERMINAL, DeployFleet, update_step, workflow

pytestmark = pytest.mark.slow
GOOD = [f"d-{i:02d}" for i in range(50)]
BAD = [f"d-{i:02d}b" for i in range(4, 50, 10)]
# 45 good and 5 bad: in start order (node ids sorted) the bad ones are the 6th, 16th, ... 46th
TENTH_BAD = sorted([n for n in GOOD if not n.endswith("5")] + BAD)
ECHO_STEP = "  - id: install\n    uses: echo\n    with: {v: 1}\n    compensate: {uses: echo, with: {undo: true}}\n"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployFleet]:
    with DeployFleet(tmp_path_factory.mktemp("deployments")) as fleet:
        devices = {n: "dtest" for n in GOOD} | {n: "dtest-bad" for n in BAD}
        devices |= {"k-1": "dtest", "v-late": "dtest", "v-quick": "dtest", "fc-a": "dtest", "fc-b": "dtest-bad",
                    "fc-c": "dtest-slow", "fc-d": "dtest"} | {f"r-{i}": "dtest-late" for i in (1, 2, 3)}
        fleet.add_devices(devices)
        yield fleet


def nodes(ids: list[str]) -> str:
    return "node=" + ",".join(ids)


def test_fifty_nodes_at_a_set_rate(fleet: DeployFleet) -> None:
    rate = 300  # per minute: one start every 200 ms at most
    dep = fleet.deploy(workflow("fw-rate", "1.0.0", update_step(0.1)), "--target", nodes(GOOD),
                       "--rate", f"{rate}/min", "--verify", "1s")
    done = fleet.wait_settled(dep)
    assert done["state"] == "succeeded", done["reason"]
    assert {ex["node"]: ex["state"] for ex in done["executions"]} == {n: "succeeded" for n in GOOD}
    starts = fleet.starts(dep)
    assert sorted(n for _, n in starts) == GOOD
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(starts)]
    spacing = 60_000 / rate
    assert min(gaps) >= spacing, gaps  # never faster than the rate, measured on the hub's own journal
    # ... and not far slower either: the rate is what paces it, not something else
    assert (starts[-1][0] - starts[0][0]) <= 3 * spacing * (len(starts) - 1), gaps
    # the CLI gives the interface's JSON, and the inventory records the version on every node
    shown = fleet.show(dep)
    assert shown["id"] == dep and shown["state"] == "succeeded" and shown["counts"] == {"succeeded": 50}
    assert all(ex["version"] == "1.0.0" and ex["version_before"] is None for ex in shown["executions"])
    versions = fleet.node_versions()
    assert all(versions[n].get("fw-rate") == "1.0.0" for n in GOOD)
    assert not any("fw-rate" in versions[n] for n in BAD)


def test_exponential_rate_grows_by_its_factor(fleet: DeployFleet) -> None:
    base, factor, every = 60, 2, 4  # 1 start/s, doubling after each 4 nodes notified
    targets = GOOD[:20]
    dep = fleet.deploy(workflow("fw-exp", "1.0.0", ECHO_STEP), "--target", nodes(targets), "--base-rate",
                       f"{base}/min", "--increment-factor", str(factor), "--grow-after-notified", str(every),
                       "--verify", "0s", "--rollback", "never")
    assert fleet.wait_settled(dep)["state"] == "succeeded"
    starts = [at for at, _ in fleet.starts(dep)]
    assert len(starts) == 20
    # the gap after the k-th start is at least the spacing of the rate once k nodes were notified
    nominal = [60_000 / min(1000, base * factor ** (k // every)) for k in range(1, 20)]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= spacing - 1 for gap, spacing in zip(gaps, nominal)), list(zip(gaps, nominal))
    # and the rate did grow: the first group starts a second apart, the fourth (8x faster) well under half that
    assert statistics.median(gaps[:3]) >= 1000 and statistics.median(gaps[11:15]) < 500, gaps


def test_ten_percent_failing_aborts_at_the_threshold_and_rolls_back(fleet: DeployFleet) -> None:
    first = fleet.deploy(workflow("fw-abort", "1.0.0", ECHO_STEP), "--target", nodes(TENTH_BAD), "--verify", "0s")
    assert fleet.wait_settled(first)["state"] == "succeeded"
    upgrade = workflow("fw-abort", "1.1.0", update_step(0.1), migrates_from=">=1.0,<2")
    dep = fleet.deploy(upgrade, "--target", nodes(TENTH_BAD), "--rate", "300/min", "--verify", "1s",
                       "--abort-threshold", "10", "--abort-min-executed", "10", "--rollback", "on-abort")
    done = fleet.wait_settled(dep)
    assert done["state"] == "aborted", done["reason"]
    match = re.fullmatch(r"aborted: (\d+) of (\d+) executed \(\d+(\.\d)?%\) failed, threshold 10%",
                         done["abort_reason"])
    assert match, done["abort_reason"]
    failed, executed = int(match[1]), int(match[2])
    assert executed >= 10 and failed * 100 >= 10 * executed

    # from the journal: the criteria held when it aborted, and it aborted as soon as they held (the pass that saw
    # them, give or take the executions ending in the same instant), before the rollout was through
    events = fleet.execution_events(dep)
    aborted_at = next(e["at"] for e in fleet.deployment_events(dep) if e["state"] == "aborted")
    ended: dict[str, str] = {}
    met_at = None
    for event in events:
        if event["state"] in TERMINAL and event["state"] != "canceled" and event["node"] not in ended:
            ended[event["node"]] = event["state"]
            bad = sum(s != "succeeded" for s in ended.values())
            if met_at is None and len(ended) >= 10 and bad * 100 >= 10 * len(ended):
                met_at = event["at"]
    assert met_at is not None and met_at <= aborted_at
    ended_between = [e for e in events if met_at < e["at"] < aborted_at and e["state"] in TERMINAL]
    assert len(ended_between) <= 5, ended_between
    started = {node for _, node in fleet.starts(dep)}
    assert len(started) < len(TENTH_BAD)

    # every execution terminal; the nodes that had completed the update rolled back, those not started canceled
    states = {ex["node"]: ex for ex in done["executions"]}
    assert set(states) == set(TENTH_BAD) and all(ex["state"] in TERMINAL for ex in states.values())
    assert not [n for n, ex in states.items() if ex["state"] == "succeeded"]
    # a failed update step left nothing to undo (no compensated step completed): failed, on the version before
    assert states[BAD[0]]["state"] == "failed" and "nothing to roll back" in states[BAD[0]]["reason"], states[BAD[0]]
    for node in set(BAD[1:]) & started:  # failed, or cancelled in progress by the abort
        assert states[node]["state"] in ("failed", "canceled"), states[node]
    succeeded_first = {e["node"] for e in events if e["state"] == "succeeded"}
    assert succeeded_first and all(states[n]["state"] == "rolled_back" for n in succeeded_first)
    never_started = set(TENTH_BAD) - started
    assert never_started and all(states[n]["state"] == "canceled" and not states[n]["runs"] for n in never_started)

    # the inventory agrees with the executions, and every node is back on (or never left) 1.0.0
    versions = fleet.node_versions()
    for node, ex in states.items():
        assert ex["version"] == versions[node].get("fw-abort") == "1.0.0", (node, ex)
        assert ex["version_before"] == ("1.0.0" if node in started else None), (node, ex)
    rows = {line.split()[0]: line for line in fleet.cli("nodes", "list", "-o", "wide").splitlines() if line.strip()}
    assert all("fw-abort@1.0.0" in rows[node] for node in TENTH_BAD), rows
    assert not [line for line in rows.values() if "fw-abort@1.1.0" in line]


def test_canary_wave_failure_stops_the_rollout(fleet: DeployFleet) -> None:
    canary = [BAD[0], "d-06", "d-07", "d-08"]  # sorted: the failing d-04b is the one node of wave 1
    dep = fleet.deploy(workflow("fw-canary", "1.0.0", update_step(0.1)), "--target", "role=gateway",
                       "--target", nodes(canary), "--rate", "120/min", "--abort-threshold", "30",
                       "--abort-min-executed", "2", "--waves", "1,100%", "--verify", "1s")
    done = fleet.wait_settled(dep)
    assert done["state"] == "aborted" and done["abort_reason"] == "aborted: wave 1: 0 of 1 succeeded, needs 100%"
    states = {ex["node"]: ex for ex in done["executions"]}
    assert states[BAD[0]]["state"] == "failed" and states[BAD[0]]["wave"] == 1
    for node in canary[1:]:
        assert states[node]["state"] == "canceled" and states[node]["wave"] == 2 and not states[node]["runs"]
    # the journal: nothing of wave 2 ever started
    assert [node for _, node in fleet.starts(dep)] == [BAD[0]]


def test_node_killed_during_its_update_ends_timed_out(fleet: DeployFleet) -> None:
    dep = fleet.deploy(workflow("fw-kill", "1.0.0", update_step(4, attempts=3)), "--target", nodes(["k-1"]),
                       "--in-progress-timeout", "6s", "--verify", "1s")
    fleet.wait_states(dep, {"k-1": "in_progress"})
    fleet.hub.wait(lambda: "k-1" in fleet.devices.busy, 60, "k-1 running its update")
    fleet.devices.kill("k-1")
    done = fleet.wait_settled(dep)
    ex = done["executions"][0]
    assert ex["state"] in ("timed_out", "rolled_back"), ex
    assert "--in-progress-timeout" in ex["reason"], ex
    run = fleet.hub.get(f"/runs/{ex['runs'][-1]}")
    assert run["state"] in ("cancelled", "failed", "timed_out"), run  # its run ended too: nothing left to wait on


def test_node_not_back_within_the_verify_window_is_rolled_back(fleet: DeployFleet) -> None:
    dep = fleet.deploy(workflow("fw-verify", "1.0.0", update_step(0.1)), "--target", nodes(["v-late", "v-quick"]),
                       "--verify", "8s", "--in-progress-timeout", "60s")
    fleet.wait_states(dep, {"v-late": "verifying", "v-quick": "verifying"})
    fleet.devices.flap("v-quick", 0.5)   # reboots and is back well inside the window: proven healthy
    fleet.devices.flap("v-late", 12)     # down past the end of the window
    done = fleet.wait_settled(dep)
    states = {ex["node"]: ex for ex in done["executions"]}
    assert states["v-quick"]["state"] == "succeeded" and "rebooted" in states["v-quick"]["reason"], states
    late = states["v-late"]
    assert late["state"] == "rolled_back" and late["version"] is None, late
    changes = [e for e in fleet.execution_events(dep) if e["node"] == "v-late"]
    assert [e["state"] for e in changes][-3:] == ["verifying", "rolling_back", "rolled_back"]
    assert "verify failed" in changes[-2]["reason"], changes[-2]
    versions = fleet.node_versions()
    assert versions["v-quick"].get("fw-verify") == "1.0.0" and "fw-verify" not in versions["v-late"]


def test_force_cancel_from_every_non_terminal_state(fleet: DeployFleet) -> None:
    # fc-a verifies for a minute, fc-b fails and rolls back for 30 s, fc-c (150x slower) updates for 30 s; fc-d
    # waits its turn behind --max-concurrent 3
    steps = ("  - id: prep\n    uses: echo\n    retry: {max_attempts: 1}\n"
             "    compensate: {uses: sleep, with: {seconds: 30}}\n" + update_step(0.2, needs="prep"))
    dep = fleet.deploy(workflow("fw-cancel", "1.0.0", steps), "--target", nodes(["fc-a", "fc-b", "fc-c", "fc-d"]),
                       "--max-concurrent", "3", "--verify", "60s", "--in-progress-timeout", "120s")
    before = fleet.wait_states(dep, {"fc-a": "verifying", "fc-b": "rolling_back", "fc-c": "in_progress",
                                     "fc-d": "queued"})
    fleet.hub.wait(lambda: {"fc-b", "fc-c"} <= fleet.devices.busy, 60, "fc-b and fc-c running steps")
    canceled = fleet.cli_json("deployments", "cancel", dep, "--force")
    assert canceled["state"] == "canceled"
    done = fleet.wait_settled(dep, timeout=30)  # well before any of those would have ended by itself
    assert {ex["node"]: ex["state"] for ex in done["executions"]} == dict.fromkeys(before, "canceled")
    for node in ("fc-b", "fc-c"):  # their runs were cancelled, and the nodes were told to stop
        run = fleet.hub.get(f"/runs/{fleet.executions(dep)[node]['runs'][-1]}")
        assert run["state"] == "cancelled", run
    fleet.hub.wait(lambda: not {"fc-b", "fc-c"} & fleet.devices.busy, 30, "fc-b and fc-c to stop their steps")
    assert not fleet.executions(dep)["fc-d"]["runs"]


def test_device_added_mid_rollout_is_deployed(fleet: DeployFleet) -> None:
    dep = fleet.deploy(workflow("fw-late", "1.0.0", update_step(0.1)), "--target", "ring=late", "--rate",
                       "60/min", "--verify", "1s")
    fleet.wait_started(dep, "r-1")
    assert fleet.cli_json("deployments", "pause", dep)["state"] == "paused"  # mid-rollout, held there
    fleet.add_devices({"r-4": "dtest-late"})
    fleet.wait_states(dep, {"r-4": "queued"})
    assert fleet.cli_json("deployments", "resume", dep)["state"] == "running"
    done = fleet.wait_settled(dep)
    assert done["state"] == "succeeded", done["reason"]
    assert {ex["node"]: ex["state"] for ex in done["executions"]} == {f"r-{i}": "succeeded" for i in (1, 2, 3, 4)}
    fired_at = next(e["at"] for e in fleet.deployment_events(dep) if e["state"] == "running")
    joined = next(e for e in fleet.execution_events(dep) if e["node"] == "r-4")
    assert joined["state"] == "queued" and joined["at"] > fired_at and "joined" in joined["reason"], joined
    assert fleet.node_versions()["r-4"].get("fw-late") == "1.0.0"


def artifact_agents(fleet: DeployFleet, tmp: Path) -> list[Any]:
    config = tmp / "agent.toml"
    config.write_text(f'[artifacts]\nenabled = true\nhub_url = "{fleet.hub.url}"\n')
    agents = [fleet.hub.agent(node, "--config", str(config)) for node in ("a-1", "a-2")]
    fleet.wait_online(["a-1", "a-2"])
    return agents


def test_bad_artifact_hash_and_bad_signature_change_nothing(fleet: DeployFleet, tmp_path: Path) -> None:
    agents = artifact_agents(fleet, tmp_path)
    targets = ("--target", nodes(["a-1", "a-2"]), "--verify", "1s")

    def add(version: str) -> dict[str, Any]:
        source = tmp_path / version / "app.bin"
        source.parent.mkdir()
        source.write_text(f"app {version}\n")
        return dict(fleet.cli_json("artifacts", "add", source, "--name", "app", "--version", version))

    def install(version: str, with_: str) -> str:
        return workflow("app", version, f"  - id: install\n    uses: artifact.install\n    with: {with_}\n"
                                        "    retry: {max_attempts: 1}\n"
                                        "    compensate: {uses: artifact.rollback, with: {artifact: app@" + version
                                        + "}}\n", migrates_from=">=1.0,<2")

    def current() -> list[str]:
        return [(agent.data / "artifacts" / "app" / "current").readlink().name for agent in agents]

    good = add("1.0.0")
    dep = fleet.deploy(install("1.0.0", "{artifact: app@1.0.0}"), *targets)
    assert fleet.wait_settled(dep)["state"] == "succeeded" and current() == ["1.0.0", "1.0.0"]

    # a wrong hash: the hub's copy of the blob changed on disk after it was added
    changed = add("1.1.0")
    blob = fleet.hub.data / "artifacts" / "blobs" / changed["sha256"]
    blob.write_bytes(blob.read_bytes().replace(b"1.1.0", b"6.6.6"))
    # a bad signature: a manifest for good bytes, signed by a key the nodes do not trust
    stranger = nacl.signing.SigningKey.generate()
    forged = seal_manifest(Manifest("app", "1.2.0", good["sha256"], good["size"], "app.bin", 1), stranger).hex()
    for version, with_, says in (("1.1.0", "{artifact: app@1.1.0}", "nothing was installed or switched"),
                                 ("1.2.0", json.dumps({"manifest": forged}), "not a hub key this node trusts")):
        dep = fleet.deploy(install(version, with_), *targets)
        done = fleet.wait_settled(dep)
        for ex in done["executions"]:
            assert ex["state"] == "failed" and says in ex["reason"], ex
            assert ex["version"] == ex["version_before"] == "1.0.0", ex
        assert current() == ["1.0.0", "1.0.0"]
        assert [fleet.node_versions()[n].get("app") for n in ("a-1", "a-2")] == ["1.0.0", "1.0.0"]
