"""Deployment schedules in the pure core: fire times journaled as decisions, kept by a snapshot and by a replay,
fired once after the hub was down at the time, and a round at each cron fire for the nodes not at the version."""

from __future__ import annotations

from datetime import datetime, timezone

from hub.events import DeploymentChanged
from tests.unit.deploydriver import DEP, DeployDriver, assert_replays, restarted


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


def changes(d: DeployDriver) -> list[DeploymentChanged]:
    return [e for e in d.journal if isinstance(e, DeploymentChanged)]


def test_cron_fire_times_are_journaled_and_survive_a_restart() -> None:
    d = DeployDriver()
    d.now = ms("2030-01-01T00:02:30")
    d.node("n00")
    d.deploy(cron="*/5 * * * *", verify="0s")
    d.run_for(200)
    (scheduled,) = changes(d)
    assert (scheduled.state, scheduled.next_fire) == ("scheduled", ms("2030-01-01T00:05:00"))
    assert d.dep().executions == {}
    for from_snapshot in (True, False):
        # The hub is down at the fire time: back at 00:07, it fires once (the missed fire), then keeps to the cron.
        again = restarted(d, ms("2030-01-01T00:07:00"), from_snapshot)
        assert again.dep().next_fire == ms("2030-01-01T00:05:00")
        again.run_for(1_000)
        fired = [e for e in changes(again) if e.fired is not None]
        assert [(e.fired, e.next_fire) for e in fired] == [(ms("2030-01-01T00:05:00"), ms("2030-01-01T00:10:00"))]
        assert fired[0].reason == "round 1 fired (due at 2030-01-01T00:05:00Z): 1 node(s) to update"
        assert again.states() == {"n00": "succeeded"}
        assert again.dep().state == "scheduled" and again.dep().next_fire == ms("2030-01-01T00:10:00")
        assert_replays(again)


def test_each_cron_fire_is_a_round_for_the_nodes_not_at_its_version() -> None:
    d = DeployDriver()
    d.now = ms("2030-01-01T00:04:59")
    d.node("n00")
    d.deploy(cron="*/5 * * * *", verify="0s")
    d.run_for(2_000)
    assert d.states() == {"n00": "succeeded"} and d.dep().round == 1
    d.node("n01")  # between rounds: it waits for the next fire
    d.run_for(60_000)
    assert "n01" not in d.states()
    d.run_for(240_000)  # 00:10:00: the second round takes n01 only; n00 is at the version already
    assert d.dep().round == 2 and d.states() == {"n00": "succeeded", "n01": "succeeded"}
    assert [(e.node, e.wave) for e in d.changes("queued")] == [("n00", 1), ("n01", 1)]
    assert d.dep().next_fire == ms("2030-01-01T00:15:00")
    assert_replays(d)


def test_a_fire_while_a_round_still_runs_is_skipped_and_the_next_one_kept() -> None:
    d = DeployDriver()
    d.now = ms("2030-01-01T00:04:59")
    d.node("n00")
    d.outcome = lambda cmd: "running"  # the round's only execution stays in progress
    d.deploy(cron="*/5 * * * *", in_progress_timeout="7m")
    d.run_for(302_000)
    skipped = [e for e in changes(d) if "skipped" in e.reason]
    assert [(e.state, e.next_fire) for e in skipped] == [("running", ms("2030-01-01T00:15:00"))]
    assert skipped[0].reason == "fire at 2030-01-01T00:10:00Z skipped: round 1 still running"


def test_a_deployment_at_a_time_fires_once_then_ends() -> None:
    d = DeployDriver()
    d.now = ms("2030-01-01T00:00:00")
    d.node("n00")
    d.deploy(at="2030-01-01T00:01:00Z", verify="0s")
    d.run_for(59_000)
    assert d.dep().state == "scheduled" and d.dep().executions == {}
    d.run_for(2_000)
    assert d.dep().state == "succeeded" and d.dep().next_fire is None
    assert d.ex("n00").started_at == ms("2030-01-01T00:01:00")
    d = DeployDriver()
    d.now = ms("2030-01-01T00:00:00")
    d.deploy(at="+30s")  # relative to the hub's clock
    assert d.core.deploys.deployments[DEP].next_fire == ms("2030-01-01T00:00:30")
