"""Take the dashboard's screenshots in docs/img/ (README.md and docs/dashboard.md show them).

    python docs/screenshots.py [--out docs/img] [--nodes 300] [--minutes 2]

A real hub on Mosquitto with `--nodes` seeded nodes (bench/dashboard.py seeds them) and three real agents on the
rpi4 profile whose telemetry follows a curve for `--minutes`; a run whose migratable step loses its node (killed)
and moves; one of the others overheats for a while, so its history has a health change and back. Then Debian's Chromium, driven by
Playwright, logs in and photographs the fleet, a node, the runs and the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dashboard import liveness, start_hub  # noqa: E402
from tests.browser import BOUND_MS, launch, log_in  # noqa: E402
from tests.hubprocess import HubProcess  # noqa: E402

POLICY = "duration: 5\nrecovery: 5\ncooldown: 0\n"
WORKFLOW = """name: line-calibration
version: 1.4.0
steps:
  - id: fetch-model
    uses: echo
    with: {model: v7}
    placement: {selector: {labels: {line: a}}}
  - id: calibrate
    uses: sleep
    with: {seconds: 600}
    needs: [fetch-model]
    migratable: true
    placement: {selector: {labels: {line: a}}}
  - id: verify
    uses: echo
    with: {ok: true}
    needs: [fetch-model]
    placement: {selector: {labels: {line: a}}}
  - id: publish
    uses: echo
    with: {done: true}
    needs: [calibrate, verify]
    placement: {selector: {labels: {line: a}}}
"""


def drive(files: dict[str, Path], stop: threading.Event, hot: dict[str, float]) -> None:
    """Telemetry curves, rewritten once a second (the agents read their overlay file at every sample); the node
    named in `hot` overheats for its 30 s."""
    started = time.monotonic()
    while not stop.wait(1.0):
        t = time.monotonic() - started
        for i, (name, path) in enumerate(files.items()):
            temp = 52 + 6 * math.sin(t / 20 + i) + (30 if 0 <= time.monotonic() - hot.get(name, -1e9) < 30 else 0)
            path.write_text(json.dumps({"cpu": round(35 + 25 * math.sin(t / 15 + i), 1), "mem": 48 + 4 * i,
                                        "disk": 61 + 3 * i, "temp": round(temp, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    parser.add_argument("--nodes", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=2.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp_name, sync_playwright() as playwright:
        tmp = Path(tmp_name)
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        # A policy with short durations, so one overheating shows in a short run.
        broker, hub = start_hub(tmp, args.nodes, "plant", "--policy", str(policy))
        stop = threading.Event()
        try:
            files = {f"press-{i:02d}": tmp / f"press-{i:02d}.json" for i in range(1, 4)}
            hot: dict[str, float] = {}
            threading.Thread(target=drive, args=(files, stop, hot), daemon=True).start()
            for name, path in files.items():
                hub.agent(name, "--profile", "rpi4", "--telemetry", "2", "--telemetry-file", str(path),
                          "--label", "line=a", "--label", "site=north", "--log-level", "warning")
            hub.wait(lambda: all(liveness(hub, n) == "online" for n in files), 60, "the presses online")
            run_id, killed = migrated_run(hub)
            shown = next(name for name in files if name != killed)
            hot[shown] = time.monotonic() + 20
            finished_runs(hub)
            time.sleep(args.minutes * 60)  # telemetry accumulates for the charts (a picture, not a test)
            shoot(playwright, hub, run_id, shown, args.out)
        finally:
            stop.set()
            hub.stop()
            broker.stop()


def migrated_run(hub: HubProcess) -> tuple[str, str]:
    """A run whose `calibrate` step lost its node (killed: its name is returned too) and runs on another."""
    run_id = hub.submit(WORKFLOW)

    def running_on() -> str | None:
        step = next(s for s in hub.get(f"/runs/{run_id}")["steps"] if s["id"] == "calibrate")
        return step["attempts"][-1]["node"] if step["attempts"] and step["attempts"][-1]["state"] == "running" else None

    first = hub.wait(running_on, 60, "calibrate running")
    next(a for a in hub.agents if a.node_id == first).kill()
    hub.wait(lambda: (node := running_on()) is not None and node != first, 60, "calibrate moved")
    return run_id, first


def finished_runs(hub: HubProcess) -> None:
    """A few runs that ended each way, for the runs list."""
    done = "name: nightly-report\nversion: 2.0.1\nsteps:\n  - id: collect\n    uses: echo\n    with: {n: 1}\n"
    broken = "name: firmware-check\nversion: 0.9.0\nsteps:\n  - id: probe\n    uses: fail\n"
    waiting = ("name: batch-export\nversion: 1.0.0\nsteps:\n  - id: export\n    uses: sleep\n    with: {seconds: 600}\n"
               "    placement: {selector: {labels: {line: z}}}\n")
    ids = [hub.submit(done), hub.submit(done), hub.submit(broken), hub.submit(waiting)]
    hub.post(f"/runs/{ids[3]}/cancel", {"reason": "export window moved"})
    for run_id in ids:
        hub.wait_run(run_id, 60)


def shoot(playwright: object, hub: HubProcess, run_id: str, node: str, out: Path) -> None:
    browser = launch(playwright)
    try:
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        log_in(page, hub.url, hub.token)
        page.wait_for_selector("#fleet tbody tr", timeout=BOUND_MS)
        page.screenshot(path=str(out / "fleet.png"))
        page.goto(f"{hub.url}/ui#/node/{node}")
        page.wait_for_selector("#node svg.chart", timeout=BOUND_MS)
        page.screenshot(path=str(out / "node.png"), full_page=True)
        page.goto(f"{hub.url}/ui#/runs")
        page.wait_for_selector("#runs tbody tr", timeout=BOUND_MS)
        page.screenshot(path=str(out / "runs.png"))
        page.goto(f"{hub.url}/ui#/run/{run_id}")
        page.wait_for_selector("svg.dag g[data-step='publish']", timeout=BOUND_MS)
        page.screenshot(path=str(out / "run.png"), full_page=True)
    finally:
        browser.close()


if __name__ == "__main__":
    main()
