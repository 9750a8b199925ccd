"""When deployments fire and when maintenance windows are open: APScheduler's triggers used as pure functions of
the clock passed in.

No scheduler runs here (no thread, no job store): the core is the scheduler. It asks these functions for a fire
time, journals it (`DeploymentChanged.next_fire`), and fires when `decide(now)` reaches it; a hub that was down at
a fire time fires once when it is back (missed fires coalesce into one). Times are epoch milliseconds, UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from apscheduler.triggers.cron import CronTrigger

UTC = timezone.utc
HORIZON_MS = 366 * 86_400_000   # how far ahead a window's waits are looked at (a yearly gap shows within it)
MOST_FIRES = 1000               # ... in at most this many fire times (a window opening every minute waits little)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@lru_cache(maxsize=256)
def cron(expr: str) -> CronTrigger:
    """The trigger of a five-field crontab expression (minute hour day month weekday), in UTC; ValueError names
    what is wrong with it."""
    return CronTrigger.from_crontab(expr, timezone=UTC)


def next_fire(expr: str, after: int) -> int | None:
    """The first fire time strictly after `after` (ms), or None when the expression never fires again."""
    # get_next_fire_time(None, now) may return `now` itself: ask from the next whole second past `after`.
    start = _dt(after).replace(microsecond=0) + timedelta(seconds=1)
    moment = cron(expr).get_next_fire_time(None, start)
    return None if moment is None else _ms(moment)


@dataclass(frozen=True)
class Window:
    """A maintenance window: nodes carrying `label=value` start updates only while it is open, from each fire time
    of `cron` for `duration_ms`."""

    label: str
    value: str
    cron: str
    duration_ms: int

    def applies(self, labels: dict[str, str]) -> bool:
        return labels.get(self.label) == self.value

    def open_at(self, now: int) -> bool:
        """Open if a fire time t has t <= now < t + duration: the first fire at or after now - duration is <= now."""
        since = _dt(now - self.duration_ms + 1)
        moment = cron(self.cron).get_next_fire_time(None, since)
        return moment is not None and _ms(moment) <= now

    def longest_wait(self, now: int) -> int:
        """The longest a node under this window may wait for it to open, from `now` over the next year: until its
        first opening, then from each closing to the next opening (a window that no longer opens: the year)."""
        trigger = cron(self.cron)
        end = now + HORIZON_MS
        closed_from, longest = now, 0
        fire = trigger.get_next_fire_time(None, _dt(now - self.duration_ms + 1))  # one open now counts from now
        for _ in range(MOST_FIRES):
            if fire is None or _ms(fire) > end:
                return max(longest, end - closed_from)
            longest = max(longest, _ms(fire) - closed_from)
            closed_from = max(closed_from, _ms(fire) + self.duration_ms)
            fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
        return longest

    def text(self) -> str:
        return f"{self.label}={self.value} {self.cron} {self.duration_ms // 1000}s"


def iso(ms: int) -> str:
    """A time in a reason people read: ISO 8601, UTC, to the second."""
    return _dt(ms).isoformat(timespec="seconds").replace("+00:00", "Z")
