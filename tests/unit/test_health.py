"""Health classification and the adaptation policy on synthetic telemetry series (pure, injected time)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hub.health import HealthTracker, LoadMonitor, Policy, SelfProtection, Threshold, load_policy
from hub.workflow import WorkflowError

TEMP = {"temp": Threshold(high=70, critical=80)}


def run(series: list[float], policy: Policy, step_ms: int = 1000) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    tracker = HealthTracker(policy)
    changes, actions = [], []
    for i, value in enumerate(series):
        c, a = tracker.observe("n1", {"temp": value}, TEMP, i * step_ms)
        changes += [(i, x.health) for x in c]
        actions += [(i, x.action) for x in a]
    return changes, actions


def test_enters_degraded_then_unhealthy_at_the_right_time() -> None:
    policy = Policy(duration=10, recovery=30)
    changes, actions = run([75.0] * 12 + [85.0] * 12, policy)
    # over high from t=0: degraded when 10 s have passed (t=10); over critical from t=12: unhealthy at t=22
    assert changes == [(10, "degraded"), (22, "unhealthy")]
    assert actions == [(10, "throttle"), (22, "migrate")]  # throttle once, then migrate on escalation


def test_leaves_only_under_the_lower_bound_for_the_recovery_time() -> None:
    policy = Policy(duration=5, recovery=20, hysteresis=0.1)
    hot = [85.0] * 6
    # 74 is under high (70)? no: 74 >= 70. 65 is under critical's bound (72) but not under high's bound (63).
    changes, actions = run(hot + [65.0] * 25 + [60.0] * 25, policy)
    assert changes == [(5, "unhealthy"), (26, "degraded"), (51, "healthy")]
    assert actions[-1] == (51, "unthrottle")


def test_hysteresis_holds_just_under_the_threshold() -> None:
    policy = Policy(duration=5, recovery=10, hysteresis=0.1)
    changes, _ = run([75.0] * 6 + [68.0] * 60, policy)  # 68 is under 70 but above the lower bound 63
    assert changes == [(5, "degraded")]


def test_a_noisy_series_around_a_threshold_does_not_flap() -> None:
    rng = random.Random(7)
    policy = Policy(duration=10, recovery=30)
    series = [70 + rng.uniform(-4, 4) for _ in range(600)]  # hovers around high=70 for ten minutes
    changes, actions = run(series, policy)
    assert len(changes) <= 1 and len(actions) <= 1


def test_triggers_fire_once_per_episode_and_respect_the_cooldown() -> None:
    policy = Policy.model_validate({"duration": 1000, "cooldown": 20, "triggers": [
        {"metric": "temp", "op": ">=", "threshold": 60, "duration": 3, "action": "alert"},
        {"metric": "temp", "op": ">=", "threshold": 65, "duration": 3, "action": "telemetry_rate"}]})
    series = [66.0] * 5 + [50.0] * 2 + [66.0] * 5 + [50.0] * 30 + [66.0] * 5
    _, actions = run(series, policy)
    # first episode: alert at t=3 (telemetry_rate due at t=3 too, held back by the cooldown);
    # second episode at t=10 is inside the cooldown; third at t=45 is not
    assert actions == [(3, "alert"), (45, "alert")]


@pytest.mark.parametrize("text, says", [
    ("duration: -1\n", "duration"),
    ("triggers:\n  - {metric: temp, threshold: 80, action: explode}\n", "action"),
    ("thresholds:\n  cpu: {high: 90, critical: 80}\n", "critical (80.0) must not be below high"),
    ("thresholds:\n  cpu: {high: 70, critical: .nan}\n", "finite number"),  # nan < 70 is false: order passed it
    ("triggers:\n  - {metric: temp, threshold: .inf, action: alert}\n", "finite number"),
    ("colour: red\n", "Extra inputs are not permitted"),
    ("- a list\n", "must be a YAML mapping"),
])
def test_bad_policies_give_clear_errors(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(WorkflowError) as caught:
        load_policy(path)
    assert says in str(caught.value) and str(path) in str(caught.value)


def test_profile_thresholds_and_overrides() -> None:
    policy = Policy.model_validate({"profiles": {"rpi4": {"temp": {"high": 60, "critical": 75}}}})
    assert policy.thresholds_for("ipc", {"temp": {"high": 80, "critical": 90}})["temp"].high == 80
    assert policy.thresholds_for("rpi4", {"temp": {"high": 80, "critical": 90}})["temp"].high == 60
    assert policy.thresholds_for("x")["cpu"].critical == 90


def test_load_monitor_needs_consecutive_samples_both_ways() -> None:
    monitor = LoadMonitor(SelfProtection(samples=3, recover_samples=2, loop_lag_ms=100))
    assert [monitor.observe(500, 1, 1) for _ in range(3)] == [None, None, True]
    assert "event-loop lag" in monitor.reason
    assert [monitor.observe(5, 1, 1), monitor.observe(500, 1, 1), monitor.observe(5, 1, 1),
            monitor.observe(5, 1, 1)] == [None, None, None, False]


_values = st.one_of(st.sampled_from([-12.0, -10.0, -9.0, 0.0, 62.0, 63.0, 69.9, 70.0, 71.0, 79.9, 80.0, 90.0]),
                    st.floats(-50, 120, allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(high=st.sampled_from([-10.0, 0.0, 63.0, 70.0]), spread=st.sampled_from([0.0, 5.0, 10.0]),
       hysteresis=st.sampled_from([0.0, 0.1, 0.5]), duration=st.sampled_from([0.0, 2.0, 5.0]),
       recovery=st.sampled_from([0.0, 3.0, 8.0]), health=st.sampled_from(["healthy", "degraded", "unhealthy"]),
       named=st.booleans(), samples=st.lists(st.tuples(st.integers(0, 4000), _values, _values), max_size=40))
# A bound below zero, where the hysteresis band lies above `high`: -9.5 is over high (-10) yet under high x 0.9 (-9).
@example(high=-10.0, spread=5.0, hysteresis=0.1, duration=0.0, recovery=0.0, health="healthy", named=False,
         samples=[(3, -9.5, 0.0)])
def test_the_healthy_shortcut_decides_what_the_full_update_decides(
        high: float, spread: float, hysteresis: float, duration: float, recovery: float, health: str, named: bool,
        samples: list[tuple[int, float, float]]) -> None:
    """Every sample, on a tracker with the shortcuts and one without: the same changes, actions and state, including
    the `since` of each run (the shortcut must leave them as the four updates would). A restart seeds a node's health
    with the names of its metrics, or with none."""
    policy = Policy(duration=duration, recovery=recovery, hysteresis=hysteresis, cooldown=3,
                    triggers=[{"metric": "cpu", "op": ">=", "threshold": high, "duration": 2, "action": "throttle"}])
    thresholds = {"cpu": Threshold(high=high, critical=high + spread), "temp": Threshold(high=70, critical=80)}
    fast, full = HealthTracker(policy), HealthTracker(policy)
    full.fast_path = False
    for tracker in (fast, full):
        tracker.seed("n1", health, False, list(thresholds) if named else [])  # a restart may seed any state
    at = 0
    for step, cpu, temp in samples:
        at += step
        # both metrics, or one of them (which one is missing changes which metric the pass meets first)
        metrics = ({"cpu": cpu, "temp": temp}, {"cpu": cpu}, {"temp": temp})[step % 3]
        assert fast.observe("n1", metrics, thresholds, at) == full.observe("n1", metrics, thresholds, at)
        assert fast.nodes == full.nodes


def test_changes_in_one_sample_come_in_the_metrics_order_whatever_the_profile_lists_first() -> None:
    tracker = HealthTracker(Policy(duration=0, recovery=0))
    thresholds = {"temp": Threshold(high=70, critical=80), "mem": Threshold(high=80, critical=90),
                  "cpu": Threshold(high=70, critical=90)}
    changes, _ = tracker.observe("n1", {"temp": 85.0, "mem": 10.0, "cpu": 95.0}, thresholds, 1_000)
    assert [(c.metric, c.health) for c in changes] == [("cpu", "unhealthy"), ("temp", "unhealthy")]
    assert tracker.nodes["n1"].health == "unhealthy"


def test_a_sample_without_some_metrics_is_judged_on_those_it_has() -> None:
    tracker = HealthTracker(Policy(duration=0, recovery=0))
    thresholds = {"cpu": Threshold(high=70, critical=90), "temp": Threshold(high=70, critical=80)}
    changes, _ = tracker.observe("n1", {"temp": 85.0}, thresholds, 1_000)  # no cpu, the first metric listed
    assert [(c.metric, c.health) for c in changes] == [("temp", "unhealthy")]
    assert tracker.nodes["n1"].health == "unhealthy" and "cpu" not in tracker.nodes["n1"].metrics
