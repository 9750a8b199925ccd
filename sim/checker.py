"""After a simulation: read the hub's API and check invariants, like a Jepsen checker.

- every run reached a terminal state;
- no step was accepted twice (at most one succeeded attempt per step);
- no result was lost (every device still alive has an empty outbox, and no attempt is left live);
- every killed device was detected as failed, with its detection time;
- every forged or replayed message was refused (when the run injected some).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


@dataclass
class Verdict:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    def render(self) -> str:
        lines = [f"{'PASS' if ok else 'FAIL'}  {name}: {detail}" for name, ok, detail in self.checks]
        lines.append(f"checker: {'PASS' if self.passed else 'FAIL'} ({sum(ok for _, ok, _ in self.checks)}/"
                     f"{len(self.checks)} checks)")
        return "\n".join(lines)


def check(get: Callable[[str], Any], killed: dict[str, int], outbox_depth: int | None = None,
          injected_bad: int = 0, refused_bad: int = 0, partitioned: dict[str, int] | None = None) -> Verdict:
    """`get(path)` reads the hub API; `killed` maps node id -> kill time (ms, wall clock)."""
    verdict = Verdict()
    runs = get("/runs?limit=100000")
    stuck = [r["id"] for r in runs if r["state"] not in TERMINAL]
    verdict.add("every run terminal", not stuck,
                f"{len(runs) - len(stuck)}/{len(runs)} terminal" + (f"; still open: {stuck[:5]}" if stuck else ""))
    twice, live = [], []
    by_state: dict[str, int] = {}
    for summary in runs:
        by_state[summary["state"]] = by_state.get(summary["state"], 0) + 1
        run = get(f"/runs/{summary['id']}")
        for step in run.get("steps", []):
            if sum(1 for a in step["attempts"] if a["state"] == "succeeded") > 1:
                twice.append(f"{run['id']}/{step['id']}")
            live += [a["id"] for a in step["attempts"] if a["state"] in ("assigned", "accepted", "running")
                     and run["state"] in TERMINAL]
    verdict.figures["runs"] = by_state
    verdict.add("no step accepted twice", not twice, f"{len(twice)} steps with two accepted results"
                + (f": {twice[:5]}" if twice else ""))
    lost_ok = not live and (outbox_depth in (None, 0))
    verdict.add("no result lost", lost_ok,
                f"live attempts in finished runs: {len(live)}; unacknowledged results on live devices: {outbox_depth}")
    nodes = {n["id"]: n for n in get("/nodes")}
    detections, undetected = [], []
    for node_id, at in sorted(killed.items()):
        node = nodes.get(node_id)
        if node is None or node["liveness"] not in ("failed", "offline"):
            undetected.append(node_id)
        else:
            detections.append(max(0, node["changed_at"] - at))
    if detections:
        verdict.figures["detection_ms"] = {"max": max(detections), "mean": round(sum(detections) / len(detections))}
    verdict.add("every killed device detected", not undetected,
                f"{len(detections)}/{len(killed)} detected" +
                (f", detection max {max(detections)} ms" if detections else "") +
                (f"; undetected: {undetected}" if undetected else ""))
    if partitioned:
        times, missed = [], []
        for node_id, start in sorted(partitioned.items()):
            history = get(f"/nodes/{node_id}").get("history", [])
            failed = [h["at"] for h in history if h["kind"] == "liveness" and h["state"] == "failed" and h["at"] >= start]
            if failed:
                times.append(failed[0] - start)
            else:
                missed.append(node_id)
        if times:
            verdict.figures["partition_detection_ms"] = {"max": max(times), "mean": round(sum(times) / len(times))}
        verdict.add("every partitioned device detected", not missed,
                    f"{len(times)}/{len(partitioned)} detected" + (f", detection max {max(times)} ms" if times else "")
                    + (f"; undetected: {missed}" if missed else ""))
    if injected_bad:
        verdict.add("every forged or replayed message refused", refused_bad >= injected_bad,
                    f"{refused_bad} refused of {injected_bad} injected")
    verdict.figures["nodes"] = {state: sum(1 for n in nodes.values() if n["liveness"] == state)
                                for state in sorted({n["liveness"] for n in nodes.values()})}
    return verdict
