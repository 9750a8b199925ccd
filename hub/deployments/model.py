"""A deployment request and the spec it becomes: parsed and checked before anything starts, each problem one line
naming the field as its flag (`--rate: must be 1-1000 per minute`).

The request is what `fleetflow deploy` sends to `POST /deployments`: the workflow (YAML text or an object), and one
field per flag, named as the flag with `_` for `-` (`abort_threshold`), given as the flag's text or as JSON numbers.
`parse_request` turns it into a `DeploymentSpec`; `DeploymentSpec.record()` is the plain data journaled in
`DeploymentCreated.spec`, which `spec_from_record` reads back with the same parser (minus the checks that depend on
when or where it was asked: the fleet's label keys, a time in the past, whether a cron still fires).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from typing import Any

from protocols import FleetflowError, is_valid_id

from ..limits import DEFAULT_LIMITS, Limits
from ..workflow import Workflow, load_workflow_text, workflow_from_data, workflow_from_object
from .schedule import Window, cron, next_fire

MAX_RATE = 1000.0                       # per minute, as AWS IoT Jobs
DAY_MS = 86_400_000
MAX_DURATION_MS = 3650 * DAY_MS         # no field takes more; a longer (or infinite) one is refused before arithmetic
DEFAULTS: dict[str, Any] = {"timeout": "24h", "in_progress_timeout": "10m", "verify": "30s", "rollback": "on-failure",
                            "abort_type": "ALL", "abort_min_executed": 1, "wave_success": 100, "retries": 0}
ROLLBACK = ("never", "on-failure", "on-abort")
ABORT_TYPES = ("FAILED", "REJECTED", "TIMED_OUT", "ALL")
FIELDS = ("workflow", "inputs", "target", "rate", "base_rate", "increment_factor", "grow_after_notified",
          "grow_after_succeeded", "max_concurrent", "waves", "wave_success", "pause_between", "abort_type",
          "abort_min_executed", "abort_threshold", "retries", "timeout", "in_progress_timeout", "verify", "rollback",
          "at", "cron", "window")
SELECTOR_KEYS = ("profile", "cap", "node", "label.KEY")


class DeploymentError(FleetflowError, ValueError):
    """A request that cannot become a deployment; `field` is the request field (the flag without its dashes)."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"{flag(field_name)}: {message}")


def flag(field_name: str) -> str:
    """How a person typed the field: the workflow is `deploy`'s argument, every other field a flag."""
    return field_name if field_name == "workflow" else "--" + field_name.replace("_", "-")


# -- the parts of a spec ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Which nodes a deployment is for: every selector must hold."""

    selectors: tuple[str, ...]
    labels: tuple[tuple[str, str], ...] = ()
    profile: str | None = None
    caps: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()

    def matches(self, node_id: str, labels: dict[str, str], profile: str, caps: Iterable[str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.labels)
                and (self.profile is None or profile == self.profile)
                and all(c in caps for c in self.caps)
                and (not self.nodes or node_id in self.nodes))


@dataclass(frozen=True)
class Rate:
    """How fast executions start: constant (`per_minute`), exponential (`base` times `factor` each time
    `grow_after` more nodes were notified or succeeded), or unlimited (both None)."""

    per_minute: float | None = None
    base: float | None = None
    factor: float = 1.0
    grow_after: int = 1
    grow_on: str = "notified"

    def current(self, notified: int, succeeded: int) -> float | None:
        if self.per_minute is not None:
            return self.per_minute
        if self.base is None:
            return None
        steps = (notified if self.grow_on == "notified" else succeeded) // self.grow_after
        return min(MAX_RATE, self.base * self.factor ** min(steps, 100))  # 1.1**100 already passes the cap

    def spacing_ms(self, notified: int, succeeded: int) -> int:
        """The least time between two starts; 0: no limit."""
        rate = self.current(notified, succeeded)
        return 0 if rate is None else math.ceil(60_000 / rate)


@dataclass(frozen=True)
class Waves:
    """Cumulative wave sizes (a count, or a percent of the target known when the round starts)."""

    sizes: tuple[str, ...] = ("100%",)
    success: float = 100.0
    pause_between: bool = False

    def plan(self, total: int) -> list[int]:
        """Cumulative counts, at least 1 each, never decreasing; the last wave takes every node left."""
        out: list[int] = []
        for size in self.sizes:
            # Exact: 10% of 30 is 3, where floats make it 3.0000000000000004 and round it up to 4.
            count = math.ceil(total * Fraction(size[:-1]) / 100) if size.endswith("%") else int(size)
            out.append(min(total, max(count, 1, out[-1] if out else 0)))
        out[-1] = total
        return out


@dataclass(frozen=True)
class Abort:
    type: str = "ALL"
    min_executed: int = 1
    threshold: float | None = None      # percent; None: no abort criteria


@dataclass(frozen=True)
class DeploymentSpec:
    workflow: dict[str, Any]            # the workflow as validated data (by alias), as runs journal it
    inputs: dict[str, Any]
    component: str
    version: str
    migrates_from: tuple[str, ...]
    executors: frozenset[str]           # what the workflow's steps use: a node without one of them rejects it
    compensated: frozenset[str]         # steps with a compensation: what a rollback can undo
    target: Target
    rate: Rate = field(default_factory=Rate)
    max_concurrent: int | None = None
    waves: Waves = field(default_factory=Waves)
    abort: Abort = field(default_factory=Abort)
    retries: int = 0
    timeout_ms: int = DAY_MS
    in_progress_timeout_ms: int = 600_000
    verify_ms: int = 30_000
    rollback: str = "on-failure"
    at: int | None = None
    cron: str | None = None
    windows: tuple[Window, ...] = ()

    def record(self) -> dict[str, Any]:
        """Plain data for the journal; `spec_from_record` reads it back."""
        rate = self.rate
        return {
            "workflow": self.workflow, "inputs": self.inputs, "target": list(self.target.selectors),
            "rate": None if rate.per_minute is None else f"{rate.per_minute:g}/min",
            "base_rate": None if rate.base is None else f"{rate.base:g}/min",
            "increment_factor": rate.factor if rate.base is not None else None,
            "grow_after_notified": rate.grow_after if rate.base is not None and rate.grow_on == "notified" else None,
            "grow_after_succeeded": rate.grow_after if rate.base is not None and rate.grow_on == "succeeded" else None,
            "max_concurrent": self.max_concurrent, "waves": list(self.waves.sizes), "wave_success": self.waves.success,
            "pause_between": self.waves.pause_between, "abort_type": self.abort.type,
            "abort_min_executed": self.abort.min_executed, "abort_threshold": self.abort.threshold,
            "retries": self.retries, "timeout": f"{self.timeout_ms}ms",
            "in_progress_timeout": f"{self.in_progress_timeout_ms}ms", "verify": f"{self.verify_ms}ms",
            "rollback": self.rollback, "at": None if self.at is None else f"{self.at}ms", "cron": self.cron,
            "window": [w.text() for w in self.windows]}


# -- parsing -------------------------------------------------------------------------------------------------------

def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise DeploymentError(name, message)


def _number(value: Any, name: str, integer: bool = False) -> float:
    """A JSON number, or the text of one (as typed after a flag); an int when `integer`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DeploymentError(name, f"expected a number, got {type(value).__name__}")
    if integer and isinstance(value, float) and not value.is_integer():
        raise DeploymentError(name, f"{value!r} is not a whole number")  # int() would truncate it silently
    try:
        number = (int if integer else float)(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise DeploymentError(name, f"{str(value)[:40]!r} is not {'an integer' if integer else 'a number'}") from None
    if not math.isfinite(number):
        raise DeploymentError(name, f"{str(value)[:40]!r} is not a finite number")
    return number


def _plain(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def _ranged(body: dict[str, Any], name: str, low: float, high: float, integer: bool = False,
            what: str = "") -> float | None:
    value = body.get(name)
    if value is None:
        return None
    number = _number(value, name, integer)
    _check(low <= number <= high, name, f"must be {_plain(low)}-{_plain(high)}{what} (got {value})")
    return number


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    number = _ranged(body, name, low, high, True)
    return None if number is None else int(number)


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour))?\s*$")
_PER_MINUTE = {None: 1.0, "m": 1.0, "min": 1.0, "s": 60.0, "sec": 60.0, "h": 1 / 60, "hour": 1 / 60}


def _rate(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    match = _RATE.match(str(value)) if not isinstance(value, bool) else None
    _check(match is not None, name, f"{value!r} is not a rate: give N/min (e.g. 120/min)")
    assert match is not None
    per_minute = float(match[1]) * _PER_MINUTE[match[2]]
    _check(1 <= per_minute <= MAX_RATE, name, f"must be 1-{MAX_RATE:g} per minute (got {value})")
    return per_minute


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "sec": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": DAY_MS}


def parse_duration(value: Any, name: str) -> int:
    """Milliseconds of "90s", "10m", "1h30m", "500ms" or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check(value >= 0, name, f"{value!r} is not a duration")
        ms = float(value) * 1000
    else:
        text = str(value).strip().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            ms = float(text) * 1000
        else:
            parts = _DURATION.findall(text)
            _check(bool(parts) and "".join(n + u for n, u in parts) == text, name,
                   f"{str(value)[:40]!r} is not a duration: give e.g. 30s, 10m, 2h, 1d")
            ms = sum(float(n) * _UNIT_MS[u] for n, u in parts)
    # 1e308 seconds, or 400 nines, are floats without a rounding (inf): refused here, never an OverflowError later.
    _check(math.isfinite(ms) and ms <= MAX_DURATION_MS, name,
           f"{str(value)[:40]!r} is too long (at most {MAX_DURATION_MS // DAY_MS} d)")
    return round(ms)


def _duration(body: dict[str, Any], name: str, low_ms: int, high_ms: int) -> int:
    ms = parse_duration(body.get(name, DEFAULTS.get(name)), name)
    _check(low_ms <= ms <= high_ms, name, f"must be {low_ms / 1000:g} s to {high_ms // DAY_MS} d (got "
                                          f"{body.get(name)})")
    return ms


def _time(value: Any, now: int | None) -> int:
    """--at: ISO 8601 (UTC unless it says otherwise), "+DURATION" from now, or (as journaled) "<ms>ms"."""
    text = str(value).strip()
    if text.endswith("ms") and text[:-2].isdigit():
        return int(text[:-2])
    if text.startswith("+"):
        _check(now is not None, "at", "a relative time needs the hub's clock")
        return int(now or 0) + parse_duration(text[1:], "at")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DeploymentError("at", f"{value!r} is not a time: give ISO 8601 (2030-01-31T02:00:00Z) or +DURATION "
                                    "(+10m)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _cron(expr: Any, name: str, now: int | None) -> str:
    _check(isinstance(expr, str) and bool(expr.strip()), name, "give a crontab expression (minute hour day month "
                                                                "weekday)")
    try:
        cron(expr)
    except ValueError as exc:
        raise DeploymentError(name, f"{expr!r}: {exc}") from None
    if now is not None:
        _check(next_fire(expr, now) is not None, name, f"{expr!r} never fires")
    return str(expr)


def _window(text: Any, now: int | None, timeout_ms: int) -> Window:
    _check(isinstance(text, str), "window", f"{text!r}: expected \"LABEL=VALUE CRON DURATION\"")
    parts = str(text).split()
    _check(len(parts) == 7, "window", f"{text!r}: expected \"LABEL=VALUE CRON DURATION\", the cron of five fields "
                                      "(e.g. \"site=berlin 0 2 * * * 2h\")")
    key, sep, value = parts[0].partition("=")
    _check(bool(sep and key and value), "window", f"{text!r}: {parts[0]!r} is not LABEL=VALUE")
    expr = _cron(" ".join(parts[1:6]), "window", now)
    duration = parse_duration(parts[6], "window")
    _check(60_000 <= duration <= 7 * DAY_MS, "window", f"{text!r}: the duration must be 1 min to 7 d")
    window = Window(key.removeprefix("label."), value, expr, duration)
    if now is not None:  # a node under a window waits queued, and --timeout bounds that wait: it must fit
        wait = window.longest_wait(now)
        _check(wait <= timeout_ms, "window", f"{text!r}: a node under it may wait {_hours(wait)} for it to open, "
                                             f"longer than --timeout {_hours(timeout_ms)} (it would time out queued)")
    return window


def _hours(ms: int) -> str:
    return f"{ms / 3_600_000:.4g} h" if ms >= 3_600_000 else f"{ms / 1000:g} s"


def parse_target(selectors: Any, known_keys: frozenset[str] | None) -> Target:
    """`--target` selectors, all of which must hold: profile=X, cap=X, node=a,b,c, label.K=V, or K=V for a label
    key a known node carries or a firmware profile declares (`known_keys`; None: not checked), or `all`."""
    if isinstance(selectors, str):
        selectors = [selectors]
    _check(isinstance(selectors, list) and bool(selectors) and all(isinstance(s, str) for s in selectors), "target",
           "give at least one selector: profile=X, cap=X, node=a,b, label.KEY=VALUE, KEY=VALUE or all")
    labels: dict[str, str] = {}
    profile: str | None = None
    caps: list[str] = []
    nodes: tuple[str, ...] = ()
    for raw in selectors:
        if raw.strip() == "all":
            continue
        key, sep, value = raw.partition("=")
        key, value = key.strip(), value.strip()
        _check(bool(sep and key and value), "target", f"{raw!r} is not KEY=VALUE")
        if key == "profile":
            _check(profile in (None, value), "target", f"profile given twice ({profile}, {value})")
            profile = value
        elif key == "cap":
            caps.append(value)
        elif key == "node":
            ids = tuple(n.strip() for n in value.split(","))
            bad = [n for n in ids if not is_valid_id(n)]
            _check(not bad, "target", f"node={value}: {bad[0] if bad else ''!r} is not a node id")
            _check(not nodes, "target", "node= given twice: list every node in one node=a,b,c")
            nodes = ids
        else:
            label = key.removeprefix("label.")
            if label == key:
                known = sorted(known_keys or ())
                _check(known_keys is None or key in known_keys, "target",
                       f"unknown selector key {key!r} (use {', '.join(SELECTOR_KEYS)}, or a label key some node or "
                       f"firmware profile has: {', '.join(known) or 'none yet'})")
            _check(bool(label), "target", f"{raw!r}: label. needs a key")
            _check(labels.get(label, value) == value, "target", f"label {label!r} given twice with two values")
            labels[label] = value
    return Target(tuple(selectors), tuple(sorted(labels.items())), profile, tuple(caps), nodes)


def _waves(body: dict[str, Any]) -> Waves:
    raw = body.get("waves") or ["100%"]
    _check(isinstance(raw, str) or (isinstance(raw, list) and all(
        isinstance(s, (str, int)) and not isinstance(s, bool) for s in raw)), "waves",
        "give cumulative sizes as text (1,10%,100%) or a list of counts and percents")
    sizes = [s.strip() for s in (raw.split(",") if isinstance(raw, str) else [str(s) for s in raw])]
    last: dict[bool, float] = {}
    for size in sizes:
        percent = size.endswith("%")
        number = _number(size[:-1] if percent else size, "waves", integer=not percent)
        _check(0 < number <= 100 if percent else number >= 1, "waves",
               f"{size!r}: a wave is a count (1 or more) or a percent (up to 100%)")
        before = last.get(percent, 0)
        _check(number >= before, "waves", f"sizes are cumulative and must not decrease ({size!r} after "
                                          f"{before:g}{'%' if percent else ''})")
        last[percent] = number
    _check(sizes[-1].endswith("%") and last.get(True) == 100, "waves",
           f"the last wave must be 100% (it takes every node left), got {sizes[-1]!r}")
    success = _ranged({**DEFAULTS, **{k: v for k, v in body.items() if v is not None}}, "wave_success", 0, 100,
                      what=" (percent)")
    pause = body.get("pause_between")
    _check(pause is None or isinstance(pause, bool), "pause_between", f"expected true or false, got {pause!r}")
    return Waves(tuple(sizes), float(100 if success is None else success), bool(pause))


def _rollout(body: dict[str, Any]) -> Rate:
    rate, base = _rate(body, "rate"), _rate(body, "base_rate")
    factor = _ranged(body, "increment_factor", 1.1, 5)
    notified = _ranged(body, "grow_after_notified", 1, 1_000_000, True)
    succeeded = _ranged(body, "grow_after_succeeded", 1, 1_000_000, True)
    if base is None:
        _check(factor is None and notified is None and succeeded is None,
               "base_rate" if rate is None else "rate", "--increment-factor and --grow-after-* go with --base-rate")
        return Rate(per_minute=rate)
    _check(rate is None, "rate", "give --rate (constant) or --base-rate (exponential), not both")
    _check(factor is not None, "increment_factor", "--base-rate needs --increment-factor (1.1-5)")
    _check((notified is None) != (succeeded is None), "grow_after_notified",
           "--base-rate needs one of --grow-after-notified N or --grow-after-succeeded N")
    return Rate(base=base, factor=float(factor or 1), grow_after=int(notified or succeeded or 1),
                grow_on="notified" if notified is not None else "succeeded")


def load_workflow(value: Any, limits: Limits = DEFAULT_LIMITS) -> Workflow:
    """The request's workflow (YAML text or an object) within `limits`; WorkflowError lists its problems."""
    if isinstance(value, str):
        return load_workflow_text(value, "workflow", limits)
    _check(isinstance(value, dict), "workflow", "give the workflow as YAML text or an object")
    return workflow_from_object(value, "workflow", limits)


def _deployable(workflow: Workflow, explicit_version: bool, rollback: str) -> tuple[frozenset[str], frozenset[str]]:
    _check(explicit_version, "workflow", f"workflow {workflow.name!r} declares no version: a deployment installs a "
                                         "version (version: MAJOR.MINOR.PATCH)")
    fanned = [s.id for s in workflow.steps if s.for_each is not None]
    _check(not fanned, "workflow", f"step {fanned[0] if fanned else ''!r} uses for_each: a deployment runs the "
                                   "workflow on each node by itself (drop for_each)")
    compensated = frozenset(s.id for s in workflow.steps if s.compensate is not None)
    _check(rollback == "never" or bool(compensated), "rollback",
           f"workflow {workflow.name!r} has no compensation (no step declares `compensate`), so it cannot be rolled "
           f"back: use --rollback never")
    return frozenset(s.uses for s in workflow.steps), compensated


def parse_request(body: dict[str, Any], known_keys: frozenset[str] | None, now: int | None,
                  limits: Limits = DEFAULT_LIMITS, workflow: Workflow | None = None) -> DeploymentSpec:
    """Check a request and make its spec. `known_keys`: the label keys a bare KEY=VALUE selector may use (None:
    not checked, as the CLI checks before it asks the hub); `now`: the hub's clock for --at +DURATION, a time in
    the past and a cron that never fires (None: a journaled spec, checked when it was made). `workflow`: the
    request's workflow when the caller parsed it already. Raises DeploymentError, or WorkflowError for the
    workflow itself."""
    unknown = sorted(set(body) - set(FIELDS))
    _check(not unknown, unknown[0] if unknown else "", "not a deployment setting")
    if workflow is None:
        workflow = load_workflow(body.get("workflow"))
    rollback = str(body.get("rollback") or DEFAULTS["rollback"])
    _check(rollback in ROLLBACK, "rollback", f"{rollback!r}: one of {', '.join(ROLLBACK)}")
    explicit = "version" in workflow.model_fields_set or now is None
    executors, compensated = _deployable(workflow, explicit, rollback)
    inputs = body.get("inputs") or {}
    _check(isinstance(inputs, dict), "inputs", "give the inputs as an object of NAME: VALUE")
    resolved = workflow.resolve_inputs(inputs)
    abort_type = str(body.get("abort_type") or DEFAULTS["abort_type"]).upper()
    _check(abort_type in ABORT_TYPES, "abort_type", f"{abort_type!r}: one of {', '.join(ABORT_TYPES)}")
    merged = {**DEFAULTS, **{k: v for k, v in body.items() if v is not None}}
    at = None if body.get("at") is None else _time(body["at"], now)
    schedule = body.get("cron")
    _check(at is None or schedule is None, "at", "give --at (once) or --cron (repeatedly), not both")
    if at is not None and now is not None:
        _check(at >= now - 60_000, "at", f"{body['at']} is in the past")
    windows = body.get("window") or []
    _check(isinstance(windows, list), "window", "give a list of \"LABEL=VALUE CRON DURATION\"")
    timeout_ms = _duration(merged, "timeout", 1000, 30 * DAY_MS)
    rate = _rollout(body)
    slowest = rate.per_minute or rate.base
    if slowest is not None and now is not None:  # queued nodes wait their turn within --timeout: one turn must fit
        spacing = math.ceil(60_000 / slowest)
        _check(spacing <= timeout_ms, "rate", f"one start every {_hours(spacing)} is longer than --timeout "
                                              f"{_hours(timeout_ms)}: queued nodes would time out waiting their turn")
    return DeploymentSpec(
        workflow=workflow.model_dump(by_alias=True, mode="json"), inputs=resolved, component=workflow.name,
        version=workflow.version, migrates_from=tuple(workflow.migrates_from), executors=executors,
        compensated=compensated, target=parse_target(body.get("target"), known_keys), rate=rate,
        max_concurrent=_integer(body, "max_concurrent", 1, 100_000), waves=_waves(body),
        abort=Abort(abort_type, int(_ranged(merged, "abort_min_executed", 1, 1_000_000, True) or 1),
                    _ranged(body, "abort_threshold", 0, 100, what=" (percent)")),
        retries=int(_ranged(merged, "retries", 0, 10, True) or 0), timeout_ms=timeout_ms,
        in_progress_timeout_ms=_duration(merged, "in_progress_timeout", 1000, 7 * DAY_MS),
        verify_ms=_duration(merged, "verify", 0, DAY_MS), rollback=rollback, at=at,
        cron=None if schedule is None else _cron(schedule, "cron", now),
        windows=tuple(_window(w, now, timeout_ms) for w in windows))


def spec_from_record(record: dict[str, Any]) -> DeploymentSpec:
    """A journaled spec: checked when it was made, so only parsed again."""
    return parse_request(record, None, None, workflow=workflow_from_data(record["workflow"]))
