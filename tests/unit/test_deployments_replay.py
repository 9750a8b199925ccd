"""Deployments restored from a snapshot taken at any point, then the rest of the journal folded, equal the whole
journal folded: the snapshot's own fields, the indexes rebuilt from it (who is busy on which node, the counters,
the sets of nodes joining, leaving and to roll back) and the next decisions. And memory that stays bounded: an
execution keeps its newest runs, ended deployments past the retention shrink to their summary."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from hub.deployments import core as deployments_core
from hub.deployments.views import detail
from hub.events import NodeRemoved
from hub.state import Core
from tests.unit.deploydriver import DEP, DeployDriver, assert_replays, fleet, workflow


def derived(core: Core) -> dict[str, Any]:
    """What a snapshot does not hold but rebuilds, with what the fold keeps in order."""
    deploys = core.deploys
    out: dict[str, Any] = {"current": dict(deploys.current), "newest": dict(deploys.newest),
                           "busy": dict(deploys.busy), "active": sorted(deploys.active), "ended": list(deploys.ended)}
    for dep in deploys.deployments.values():
        out[dep.id] = {"live": sorted(dep.live), "active": dep.active, "executed": dep.executed,
                       "undo": sorted(dep.undo), "stopping": sorted(dep.stopping), "joining": sorted(dep.joining),
                       "leaving": sorted(dep.leaving), "failures": {k: v for k, v in dep.failures.items() if v},
                       "tally": {w: {str(k): v for k, v in c.items() if v} for w, c in dep.tally.items() if +c},
                       "order": list(dep.executions)}
    out["versions"] = {node.id: dict(node.versions) for node in core.nodes.values()}
    return out


def scenario(kind: str) -> DeployDriver:
    d = fleet(6, site="a")
    if kind == "abort":  # retries, an abort, rollbacks of succeeded nodes, a node joining meanwhile
        d.outcome = lambda cmd: not (cmd.node in ("n03", "n04") and cmd.step == "install" and cmd.run.endswith(".1"))
        d.deploy(waves="2,100%", verify="1s", rollback="on-abort", abort_threshold=30, abort_min_executed=2,
                 retries=1, rate="600/min")
        d.run_for(2_500)
        d.node("n09", labels={"site": "a"})
        d.run_for(6_000)
    elif kind == "cron":  # rounds, a node deleted and one added between them
        d.deploy(cron="* * * * *", verify="0s", rollback="never")
        d.run_for(65_000, step=500)
        d.feed(NodeRemoved(d.now, "n01", "gone", True))
        d.node("n07", labels={"site": "a"})
        d.run_for(65_000, step=500)
    else:  # two deployments of one component on one node: an abort's rollback meets a newer deployment
        d.outcome = lambda cmd: None if cmd.node == "n01" and cmd.run.startswith("d-000000000a") else True
        d.deploy("d-000000000a", verify="0s", rollback="on-abort", abort_threshold=50, abort_min_executed=2,
                 in_progress_timeout="5s", target=["node=n00,n01"])
        d.run_for(1_000)
        d.deploy("d-000000000b", workflow=workflow("1.0.1"), target=["node=n00"], verify="10s", rollback="never")
        d.run_for(8_000)
    return d


@pytest.mark.parametrize("kind", ["abort", "cron", "two deployments"])
def test_a_snapshot_at_any_point_plus_the_rest_of_the_journal_equals_the_whole_fold(kind: str) -> None:
    d = scenario(kind)
    full = Core().fold(d.journal)
    expected, decisions = derived(full), [repr(e) for e in full.decide(d.now + 1)]
    for cut in range(0, len(d.journal), max(1, len(d.journal) // 60)):
        restored = Core.from_snapshot(cbor2.loads(cbor2.dumps(Core().fold(d.journal[:cut]).to_snapshot())))
        restored.fold(d.journal[cut:])
        assert derived(restored) == expected, cut
        assert [repr(e) for e in restored.decide(d.now + 1)] == decisions, cut


def test_an_execution_keeps_its_newest_runs_and_counts_them_all() -> None:
    d = fleet(1)
    d.outcome = lambda cmd: False  # every round of the cron deployment fails on it, and it is tried again
    d.deploy(cron="* * * * *", verify="0s", rollback="never")
    d.run_for(20 * 60_000, step=1_000)
    ex = d.ex("n00")
    assert d.dep().round == 20 and ex.runs == [f"{DEP}.n00.{n}" for n in range(16, 21)]
    (shown,) = detail(d.dep())["executions"]
    assert shown["runs"] == ex.runs and shown["run_count"] == 20
    assert_replays(d)


def test_ended_deployments_past_the_retention_shrink_to_their_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deployments_core, "RETAIN_ENDED", 2)
    d = fleet(1)
    ids = [f"d-00000000{i:02}" for i in range(5)]
    for patch, dep_id in enumerate(ids):
        d.deploy(dep_id, workflow=workflow(f"1.0.{patch}"), verify="0s")
        d.run_for(1_000)
    deploys = d.core.deploys
    assert list(deploys.archived) == ids[:3] and list(deploys.deployments) == ids[3:]
    assert list(deploys.ended) == ids[3:]
    summary = deploys.archived[ids[0]]
    assert (summary["state"], summary["version"], summary["counts"], summary["archived"]) == (
        "succeeded", "1.0.0", {"succeeded": 1}, True)
    d.node("late")  # the newest deployment, whole, still takes a node that joins
    d.run_for(1_000)
    assert d.states(ids[-1])["late"] == "succeeded" and d.core.nodes["late"].versions == {"app": "1.0.4"}
    assert_replays(d)
