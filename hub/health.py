"""Node health and the adaptation policy. Pure: samples and times go in, classification changes and actions come out.

Health per metric, against `high` and `critical` thresholds (from the node's firmware profile, overridable here):
- Healthy -> Degraded after the value stayed >= high for `duration`; -> Unhealthy after >= critical for `duration`.
- Leaving needs the value under a lower bound (threshold x (1 - hysteresis)) for `recovery`: Unhealthy -> Degraded
  under critical's bound, Degraded -> Healthy under high's bound. A noisy series around a threshold keeps resetting
  the clock in one direction or the other, so it does not flap.
A node's health is its worst metric. Triggers `{metric, op, threshold, duration, action}` fire an action once each
time their condition has held for `duration`. Actions on a node are at most one per `cooldown`, except that
recovery (unthrottle) is never held back.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .runnable import UnrunnablePolicy
from .transitions import Health
from .workflow import WorkflowError, load_model_text

Action = Literal["throttle", "migrate", "circuit_break", "drain", "alert", "telemetry_rate"]
HEALTH_ORDER = {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.UNHEALTHY: 2}
_first = operator.itemgetter(0)
OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(_Model):
    high: float = Field(allow_inf_nan=False, description="at or over this for `duration`: degraded")
    critical: float = Field(allow_inf_nan=False, description="at or over this for `duration`: unhealthy (not below "
                                                             "high)")

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.critical < self.high:
            raise ValueError(f"critical ({self.critical}) must not be below high ({self.high})")
        return self


class Trigger(_Model):
    metric: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="a telemetry metric (cpu, mem, disk, "
                                                                        "temp, load1, ...)")
    op: Literal[">", ">=", "<", "<="] = Field(">=", description="how the metric compares with the threshold")
    threshold: float = Field(allow_inf_nan=False, description="the value the metric is compared with")
    duration: float = Field(60.0, ge=0, description="seconds the comparison must hold before the action fires")
    action: Action = Field(description="what to do; fires once each time the condition has held for `duration`")


class Breaker(_Model):
    failures: int = Field(3, ge=1, description="step failures on a node within `window` that open its breaker")
    window: float = Field(300.0, gt=0, description="seconds over which failures are counted")
    cooldown: float = Field(60.0, gt=0, description="seconds open before half-open")
    successes: int = Field(1, ge=1, description="successes while half-open that close it")


class Limits(_Model):
    max_migrations_per_run: int = Field(3, ge=0, description="migrations of one run's steps within `window`")
    max_migrations_per_node: int = Field(10, ge=0, description="migrations off one node within `window`")
    window: float = Field(600.0, gt=0, description="seconds over which migrations are counted")


class SelfProtection(_Model):
    loop_lag_ms: float = Field(250.0, gt=0, description="event-loop lag over which a sample counts as overloaded")
    journal_commit_ms: float = Field(500.0, gt=0, description="journal commit time over which a sample counts as "
                                                              "overloaded")
    cpu_percent: float = Field(90.0, gt=0, description="hub process CPU over which a sample counts as overloaded")
    samples: int = Field(3, ge=1, description="consecutive overloaded samples before acting")
    recover_samples: int = Field(10, ge=1, description="consecutive good samples before recovering")
    telemetry_factor: float = Field(4.0, ge=1, description="telemetry interval multiplier while overloaded")


DEFAULT_THRESHOLDS = {"cpu": Threshold(high=70, critical=90), "mem": Threshold(high=80, critical=95),
                      "disk": Threshold(high=85, critical=95), "temp": Threshold(high=70, critical=85)}


class Policy(_Model):
    duration: float = Field(60.0, ge=0, description="seconds over a threshold before the state is entered")
    recovery: float = Field(300.0, ge=0, description="seconds under the lower bound before it is left")
    hysteresis: float = Field(0.1, ge=0, lt=1, description="lower bound to leave a state: threshold x (1 - "
                                                           "hysteresis)")
    cooldown: float = Field(120.0, ge=0, description="seconds between actions on one node")
    thresholds: dict[str, Threshold] = Field(default_factory=lambda: dict(DEFAULT_THRESHOLDS),
                                             description="per metric, over the firmware profiles' own")
    profiles: dict[str, dict[str, Threshold]] = Field(default_factory=dict,
                                                      description="per firmware profile, per metric: overrides")
    on_degraded: list[Action] = Field(default_factory=lambda: list[Action](["throttle"]),
                                      description="actions when a node becomes degraded")
    on_unhealthy: list[Action] = Field(default_factory=lambda: list[Action](["throttle", "migrate"]),
                                       description="actions when a node becomes unhealthy")
    triggers: list[Trigger] = Field(default_factory=list, description="metric rules mapped to actions")
    breaker: Breaker = Field(default_factory=Breaker, description="per-node circuit breaker on step failures")
    limits: Limits = Field(default_factory=Limits, description="caps on migrations")
    self_protection: SelfProtection = Field(default_factory=SelfProtection,
                                            description="when the hub itself is overloaded")
    unrunnable: UnrunnablePolicy = Field(default_factory=UnrunnablePolicy,
                                         description="work that can never run fails instead of waiting")

    def thresholds_for(self, profile: str, profile_thresholds: dict[str, dict[str, float]] | None = None
                       ) -> dict[str, Threshold]:
        """Defaults, then the firmware profile's thresholds, then this policy's per-profile overrides."""
        out = dict(self.thresholds)
        for metric, t in (profile_thresholds or {}).items():
            if "high" in t and "critical" in t:
                out[metric] = Threshold(high=t["high"], critical=t["critical"])
        out.update(self.profiles.get(profile, {}))
        return out


def load_policy(path: Path) -> Policy:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise WorkflowError([(str(path), f"cannot read: {exc.strerror}")]) from None
    return load_model_text(Policy, text, str(path), "a hub policy file must be a YAML mapping")


@dataclass(frozen=True)
class HealthChange:
    node: str
    health: Health
    previous: Health
    metric: str
    value: float
    threshold: float
    duration: float
    at: int

    @property
    def reason(self) -> str:
        verb = "over" if HEALTH_ORDER[self.health] > HEALTH_ORDER[self.previous] else "under"
        return (f"{self.metric} {self.value:g} {verb} {self.threshold:g} for {self.duration:g} s: "
                f"{self.previous} -> {self.health}")


@dataclass(frozen=True)
class ActionDue:
    node: str
    action: str
    reason: str
    at: int


@dataclass
class _Run:
    """Since when a condition has held without a break (None: it does not hold now)."""

    since: int | None = None

    def update(self, holds: bool, at: int) -> float:
        if not holds:
            self.since = None
            return 0.0
        if self.since is None:
            self.since = at
        return (at - self.since) / 1000


@dataclass
class _MetricState:
    state: Health = Health.HEALTHY
    over_high: _Run = field(default_factory=_Run)
    over_critical: _Run = field(default_factory=_Run)
    under_high: _Run = field(default_factory=_Run)
    under_critical: _Run = field(default_factory=_Run)


@dataclass
class _NodeState:
    health: Health = Health.HEALTHY
    metrics: dict[str, _MetricState] = field(default_factory=dict)
    triggers: dict[int, _Run] = field(default_factory=dict)
    fired: set[int] = field(default_factory=set)
    last_action: int | None = None
    throttled: bool = False


class HealthTracker:
    # The shortcuts for a healthy metric under every bound and a healthy node whose metrics did not change; tests
    # switch them off to compare with the full update.
    fast_path = True

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.nodes: dict[str, _NodeState] = {}

    def seed(self, node: str, health: Health, throttled: bool, metrics: list[str]) -> None:
        """After a hub restart: start from the journaled health, so recovery still has to be earned."""
        if node not in self.nodes:
            self.nodes[node] = _NodeState(health=health, throttled=throttled,
                                          metrics={m: _MetricState(state=health) for m in metrics})

    def observe(self, node: str, metrics: dict[str, float], thresholds: dict[str, Threshold], at: int
                ) -> tuple[list[HealthChange], list[ActionDue]]:
        p = self.policy
        ns = self.nodes.setdefault(node, _NodeState())
        changes: list[HealthChange] = []
        full: list[tuple[str, Threshold, float, _MetricState]] = []
        for metric, threshold in thresholds.items():
            if metric not in metrics:
                continue
            value = metrics[metric]
            ms = ns.metrics.get(metric) or ns.metrics.setdefault(metric, _MetricState())
            if (self.fast_path and ms.state == Health.HEALTHY
                    and value < min(threshold.high, threshold.high * (1 - p.hysteresis))):
                # The common case, under every bound of a healthy metric (critical is never below high): what the
                # four updates and the transitions below come to, with no change possible. Runs once per metric of
                # every telemetry message the hub receives.
                ms.over_high.since = ms.over_critical.since = None
                if ms.under_high.since is None:
                    ms.under_high.since = at
                if ms.under_critical.since is None:
                    ms.under_critical.since = at
                continue
            full.append((metric, threshold, value, ms))
        # The changes come in the metrics' order (the order of the fast path's metrics changes nothing)
        for metric, threshold, value, ms in sorted(full, key=_first):
            over_high = ms.over_high.update(value >= threshold.high, at)
            over_critical = ms.over_critical.update(value >= threshold.critical, at)
            under_high = ms.under_high.update(value < threshold.high * (1 - p.hysteresis), at)
            under_critical = ms.under_critical.update(value < threshold.critical * (1 - p.hysteresis), at)
            new = ms.state
            if ms.state != Health.UNHEALTHY and over_critical >= p.duration and ms.over_critical.since is not None:
                new, used, held = Health.UNHEALTHY, threshold.critical, over_critical
            elif ms.state == Health.HEALTHY and over_high >= p.duration and ms.over_high.since is not None:
                new, used, held = Health.DEGRADED, threshold.high, over_high
            elif ms.state == Health.UNHEALTHY and under_critical >= p.recovery and ms.under_critical.since is not None:
                healthy = under_high >= p.recovery and ms.under_high.since is not None
                new = Health.HEALTHY if healthy else Health.DEGRADED
                used = threshold.high * (1 - p.hysteresis) if healthy else threshold.critical * (1 - p.hysteresis)
                held = under_high if healthy else under_critical
            elif ms.state == Health.DEGRADED and under_high >= p.recovery and ms.under_high.since is not None:
                new, used, held = Health.HEALTHY, threshold.high * (1 - p.hysteresis), under_high
            if new != ms.state:
                changes.append(HealthChange(node, new, ms.state, metric, value, used, round(held, 3), at))
                ms.state = new
        # No metric changed on a healthy node: every one of its metrics is healthy still, and so is the node.
        worst = (ns.health if self.fast_path and not changes and ns.health == Health.HEALTHY else
                 max((m.state for m in ns.metrics.values()), key=HEALTH_ORDER.__getitem__, default=Health.HEALTHY))
        actions: list[ActionDue] = []
        if worst != ns.health:
            previous, ns.health = ns.health, worst
            causes = [c for c in changes if c.health == worst]
            reason = causes[-1].reason if causes else f"health {previous} -> {worst}"
            if worst == Health.HEALTHY and ns.throttled:
                ns.throttled = False
                actions.append(ActionDue(node, "unthrottle", f"recovered: {reason}", at))
            elif HEALTH_ORDER[worst] > HEALTH_ORDER[previous]:
                wanted = p.on_unhealthy if worst == Health.UNHEALTHY else p.on_degraded
                actions += self._act(ns, node, list(wanted), reason, at, escalation=True)
        for index, trigger in enumerate(p.triggers):
            if trigger.metric not in metrics:
                continue
            run = ns.triggers.setdefault(index, _Run())
            held = run.update(OPS[trigger.op](metrics[trigger.metric], trigger.threshold), at)
            if run.since is None:
                ns.fired.discard(index)  # re-armed once the condition clears
            elif held >= trigger.duration and index not in ns.fired:
                ns.fired.add(index)
                reason = (f"trigger {trigger.metric} {trigger.op} {trigger.threshold:g} held {held:g} s "
                          f"(value {metrics[trigger.metric]:g})")
                actions += self._act(ns, node, [trigger.action], reason, at)
        return changes, actions

    def _act(self, ns: _NodeState, node: str, wanted: list[str], reason: str, at: int,
             escalation: bool = False) -> list[ActionDue]:
        cooldown_ms = self.policy.cooldown * 1000
        # Escalating health always gets its actions; other actions wait out the node's cooldown.
        if not escalation and ns.last_action is not None and at - ns.last_action < cooldown_ms:
            return []
        ns.last_action = at
        out = []
        for action in wanted:
            if action == "throttle":
                if ns.throttled:
                    continue
                ns.throttled = True
            out.append(ActionDue(node, action, reason, at))
        return out


class LoadMonitor:
    """The hub's own load: event-loop lag, journal commit time, CPU. Overloaded after `samples` bad samples in a
    row, recovered after `recover_samples` good ones. Returns the new state when it changes."""

    def __init__(self, policy: SelfProtection) -> None:
        self.policy = policy
        self.overloaded = False
        self._bad = 0
        self._good = 0
        self.reason = ""

    def observe(self, loop_lag_ms: float, commit_ms: float, cpu_percent: float) -> bool | None:
        p = self.policy
        reasons = [f"{name} {value:.0f} over {limit:.0f}" for name, value, limit in (
            ("event-loop lag ms", loop_lag_ms, p.loop_lag_ms), ("journal commit ms", commit_ms, p.journal_commit_ms),
            ("cpu %", cpu_percent, p.cpu_percent)) if value > limit]
        if reasons:
            self._bad, self._good = self._bad + 1, 0
            if not self.overloaded and self._bad >= p.samples:
                self.overloaded, self.reason = True, "; ".join(reasons)
                return True
        else:
            self._good, self._bad = self._good + 1, 0
            if self.overloaded and self._good >= p.recover_samples:
                self.overloaded, self.reason = False, "load back under every limit"
                return False
        return None
