"""A checker's verdict: named checks, each passed or failed with a detail, and figures. What `fleetflow sim` and
`fleetflow demo` print (`PASS  <check>: <detail>` lines, then `checker: PASS (n/m checks)`; scripts read them) and
what `--report` writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_SHOWN = 5  # examples named per failed check

TITLES = {
    "runs-terminal": "every run terminal", "runs-expected": "every run ended as expected",
    "accepted-once": "no step accepted twice", "fences": "fences only grow",
    "assign-journaled": "every assignment sent was journaled", "results-journaled": "no result lost",
    "acked-journaled": "every acknowledged result journaled", "outboxes-drained": "every outbox drained",
    "wire-verifies": "every accepted message verifies", "refusals": "every forged or replayed message refused",
    "killed-detected": "every killed device detected", "partition-detected": "every partitioned device detected",
    "replay": "the journal replays to the hub's state",
}


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: str
    detail: str


@dataclass
class Verdict:
    """Checks in order, each (title, passed, detail); `ids` holds each one's invariant id."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    @property
    def violations(self) -> list[Violation]:
        return [Violation(i, detail) for i, (_, ok, detail) in zip(self.ids, self.checks) if not ok]

    def add(self, name: str, ok: bool, detail: str, invariant: str | None = None) -> None:
        self.checks.append((name, ok, detail))
        self.ids.append(invariant or name)

    def judged(self, invariant: str, problems: list[str], passed: str, what: str = "") -> None:
        """A check from its problems: PASS with `passed`, or FAIL with how many and the first few."""
        if not problems:
            self.add(TITLES[invariant], True, passed, invariant)
            return
        shown = "; ".join(problems[:MAX_SHOWN])
        more = f"; and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
        self.add(TITLES[invariant], False, f"{len(problems)}{what}: {shown}{more}", invariant)

    def render(self) -> str:
        lines = [f"{'PASS' if ok else 'FAIL'}  {name}: {detail}" for name, ok, detail in self.checks]
        lines.append(f"checker: {'PASS' if self.passed else 'FAIL'} ({sum(ok for _, ok, _ in self.checks)}/"
                     f"{len(self.checks)} checks)")
        return "\n".join(lines)


